"""Sliding-window attention kernel (NSA paper §3.3.3).

Query t attends to keys max(0, t-w+1) .. t: the banded flash attention of
`pallas_kernels/_flash.py` with key j at position j and a band of width w, so each query
tile loops over about (tile + w) keys. Packed rows: keys before the first token of the
query's document are masked too (`_flash.Documents`). Design:
docs/kernels.md#window-attention. Reference: `nsa_jax.ops.window.window_attention_xla`.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _flash, _flash_tiles, _util

# Config A (G=16: 8 tokens x 16 heads per forward query tile); float32 inputs
# get `TILES.for_float32()`. Backward tiles of 32 rows on 4 warps (measured:
# experiments/PERF_NOTES.md, "Measurements behind the code's defaults").
# On a GPU, `nsa_jax.ops` runs the 16-bit windows cuDNN takes on cuDNN.
TILES = _flash_tiles.Tiles(bwd_block_m=32, bwd_num_warps=4)


def default_tiles(q, k, v) -> _flash_tiles.Tiles | None:
  """`TILES` (float32: `Tiles.for_float32`) fitted to the device's shared memory
  (`_flash_tiles.fit_tiles`: unchanged where they fit); None where no tiles fit."""
  tiles = TILES.for_float32() if q.dtype == jnp.float32 else TILES
  return _flash_tiles.fit_tiles(tiles, q.shape[2] // k.shape[2], q.shape[-1], v.shape[-1],
                          jnp.dtype(q.dtype).itemsize, _util.shared_memory_budget())


def unsupported(q, k, v, *, window: int) -> str | None:
  """Why the kernel cannot take these (validated) inputs, or None."""
  return _flash_tiles.unsupported(q, k, v, default_tiles(q, k, v))


def window_attention(q, k, v, *, window: int, scale: float,
                     interpret: bool, tiles: _flash_tiles.Tiles | None = None,
                     doc_start=None, doc_end=None, q_offset=None):
  """q [B,T,HQ,Dk], k/v [B,S,HKV,Dk/Dv] -> o [B,T,HQ,Dv] over the last `window` keys of
  each query; differentiable in q, k, v.

  Packed rows: doc_start [B, T] int32, the first position of each query's document,
  and doc_end [B, S] int32, one past the last position of each key's document, or
  both None. q_offset: int32 scalar position of query row 0 (keys from 0), or None.
  """
  tiles = default_tiles(q, k, v) if tiles is None else tiles
  docs = None if doc_start is None else _flash.Documents(query_start=doc_start,
                                                         key_end=doc_end)
  band = _flash.Band(stride=1, offset=0, window=window)
  o, _ = _flash.banded_attention(q, k, v, docs, q_offset, band, scale, tiles, interpret)
  return o
