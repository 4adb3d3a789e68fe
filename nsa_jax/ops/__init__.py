"""The op-level API (docs/api.md#ops), one op per file."""
from nsa_jax.ops.compressed import compressed_attention
from nsa_jax.ops.decode import nsa_decode
from nsa_jax.ops.dense import dense_attention
from nsa_jax.ops.nsa import nsa
from nsa_jax.ops.selected import selected_attention
from nsa_jax.ops.selection import select_blocks
from nsa_jax.ops.window import window_attention

__all__ = ["compressed_attention", "dense_attention", "nsa", "nsa_decode", "select_blocks",
           "selected_attention", "window_attention"]
