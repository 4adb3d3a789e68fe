"""Sliding-window attention kernel (NSA paper §3.3.3; SPEC §3 "Sliding window").

Query t attends to keys max(0, t-w+1) .. t. This is the banded flash
attention of `pallas_kernels/_flash.py` with key j at position j and a band of
width w, so each query tile loops over about (tile + w) keys: work grows with
T * w. Reference: `nsa_jax.ops.window.window_attention_xla`.
"""
from __future__ import annotations

import jax.numpy as jnp

from nsa_jax.config import NSAConfig
from pallas_kernels import _flash

# Config A (G=16: 8 tokens x 16 heads per forward query tile); float32 inputs
# get `TILES.for_float32()`. Backward tiles of 32 rows, 4 warps: fwd+bwd
# 20.8 ms against 27.7 ms with the 64-row, 8-warp defaults (H200, T=64k,
# experiments/results/check_flash_h200.json; both at 2 backward stages, 24.1 ms
# at the 1 stage that computes dk right). On a GPU, cuDNN runs the 16-bit
# windows it takes instead (nsa_jax.ops._common.cudnn_runs).
TILES = _flash.Tiles(bwd_block_m=32, bwd_num_warps=4)


def window_attention(q, k, v, *, config: NSAConfig, scale: float,
                     interpret: bool, tiles: _flash.Tiles | None = None):
  """q [B,T,HQ,Dk], k/v [B,T,HKV,Dk/Dv] -> o [B,T,HQ,Dv]; differentiable in q, k, v."""
  _flash.check_dtype(q)
  if tiles is None:
    tiles = TILES.for_float32() if q.dtype == jnp.float32 else TILES
  band = _flash.Band(stride=1, offset=0, window=config.window)
  o, _ = _flash.banded_attention(q, k, v, band, scale, tiles, interpret)
  return o
