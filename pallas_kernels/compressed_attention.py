"""Compressed-token attention kernel (NSA paper §3.3.1, Eq. 7; SPEC §3).

Query t attends to compressed block i iff the block lies wholly in its past,
i*d + l - 1 <= t. This is the banded flash attention of
`pallas_kernels/_flash.py` with key i at position i*d + l - 1 and no lower
edge; the mask is monotone, so a query tile loops only over the blocks visible
to its last token. Rows that see no block get o = 0 and lse = -inf.
Reference: `nsa_jax.ops.compressed.compressed_attention_xla`.
"""
from __future__ import annotations

import jax.numpy as jnp

from nsa_jax.config import NSAConfig
from pallas_kernels import _flash

# Config A. The dk/dv loop of an early key block runs over nearly all T
# queries, so it is split over query chunks to balance the programs: 16
# chunks, fwd+bwd 89.4 ms against 91.3 ms with 8. Backward kernels on 4 warps
# instead of 8: fwd+bwd 49.4 ms against 88.7 ms (H200, T=64k,
# experiments/results/check_flash_sweep_h200.json).
TILES = _flash.Tiles(dkv_splits=16, bwd_num_warps=4)


def compressed_attention(q, k_cmp, v_cmp, *, config: NSAConfig, scale: float,
                         interpret: bool, tiles: _flash.Tiles | None = None):
  """q [B,T,HQ,Dk], k_cmp/v_cmp [B,Tc,HKV,Dk/Dv] -> (o [B,T,HQ,Dv], lse [B,T,HQ] f32)."""
  _flash.check_dtype(q)
  if tiles is None:
    tiles = TILES.for_float32() if q.dtype == jnp.float32 else TILES
  B, T, HQ, _ = q.shape
  if k_cmp.shape[1] == 0:   # T < l: no compressed block exists yet
    return (jnp.zeros((B, T, HQ, v_cmp.shape[-1]), q.dtype),
            jnp.full((B, T, HQ), -jnp.inf, jnp.float32))
  band = _flash.Band(stride=config.compress_stride,
                     offset=config.compress_block - 1, window=None)
  return _flash.banded_attention(q, k_cmp, v_cmp, band, scale, tiles, interpret)
