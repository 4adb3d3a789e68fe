"""nsa_jax: Native Sparse Attention (arXiv 2502.11089) in JAX, Flax NNX and Pallas."""
from nsa_jax.config import NSAConfig
from nsa_jax.ops import (compressed_attention, nsa, select_blocks,
                         selected_attention, window_attention)

__all__ = ["NSAConfig", "compressed_attention", "nsa", "select_blocks",
           "selected_attention", "window_attention"]
__version__ = "0.1.0"
