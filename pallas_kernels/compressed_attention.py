"""Compressed-token attention kernel (NSA paper §3.3.1, Eq. 7).

Query t attends to compressed block i iff i*d + l - 1 <= t: the banded flash attention of
`pallas_kernels/_flash.py` with key i at position i*d + l - 1 and no lower edge, so a query
tile loops only over the blocks visible to its last token. Rows that see no block get o = 0
and lse = -inf. Packed rows: block i counts only where s(t) <= i*d (`_flash.Documents`).
Design: docs/kernels.md#compressed-attention. Reference:
`nsa_jax.ops.compressed.compressed_attention_xla`.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels import _flash, _flash_tiles, _util

# Config A's tiles. The dk/dv loop of an early key block runs over nearly all T
# queries, so it is split over 16 query chunks to balance the programs; the
# backward kernels run on 4 warps (measured:
# experiments/PERF_NOTES.md, "Measurements behind the code's defaults").
TILES = _flash_tiles.Tiles(dkv_splits=16, bwd_num_warps=4)
# Heads wider than 128 (Config B: Dk = 192, padded to 256 in the kernels) take
# backward tiles of 32 rows.
WIDE_HEAD_BWD_BLOCK_M = 32


def unsupported(q, k_cmp, v_cmp) -> str | None:
  """Why the kernel cannot take these (validated) inputs, or None."""
  return _flash_tiles.unsupported(q, k_cmp, v_cmp, default_tiles(q, k_cmp, v_cmp))


def compressed_attention(q, k_cmp, v_cmp, *, block: int, stride: int, scale: float,
                         interpret: bool, tiles: _flash_tiles.Tiles | None = None,
                         doc_start=None, doc_end=None, q_offset=None):
  """q [B,T,HQ,Dk], k_cmp/v_cmp [B,Tc,HKV,Dk/Dv] -> (o [B,T,HQ,Dv], lse [B,T,HQ] f32);
  compressed block i (of `block` tokens, every `stride`) ends at token i*stride + block - 1.

  Packed rows: doc_start [B, T] int32, the first position of each query's document,
  and doc_end [B, N] int32, one past the last position of each token's document
  (N >= (Tc - 1) * stride + 1 tokens: the row's), or both None.
  q_offset: int32 scalar position of query row 0 (the keys' row is from 0), or None.
  """
  tiles = default_tiles(q, k_cmp, v_cmp) if tiles is None else tiles
  B, T, HQ, _ = q.shape
  Tc = k_cmp.shape[1]
  if Tc == 0:   # T < l: no compressed block exists yet
    return (jnp.zeros((B, T, HQ, v_cmp.shape[-1]), q.dtype),
            jnp.full((B, T, HQ), -jnp.inf, jnp.float32))
  docs = None if doc_start is None else _flash.Documents(
      query_start=doc_start, key_end=doc_end[:, :(Tc - 1) * stride + 1:stride])
  band = _flash.Band(stride=stride, offset=block - 1, window=None)
  return _flash.banded_attention(q, k_cmp, v_cmp, docs, q_offset, band, scale, tiles,
                                 interpret)


def default_tiles(q, k_cmp, v_cmp) -> _flash_tiles.Tiles | None:
  """`TILES` for q's dtype (`Tiles.for_float32`) and head width (Dk > 128:
  `WIDE_HEAD_BWD_BLOCK_M` backward rows), fitted to the device's shared memory
  (`_flash_tiles.fit_tiles`: unchanged where they fit); None where no tiles fit."""
  tiles = TILES.for_float32() if q.dtype == jnp.float32 else TILES
  if q.shape[-1] > 128:
    tiles = dataclasses.replace(
        tiles, bwd_block_m=min(tiles.bwd_block_m, WIDE_HEAD_BWD_BLOCK_M))
  return _flash_tiles.fit_tiles(tiles, q.shape[2] // k_cmp.shape[2], q.shape[-1], v_cmp.shape[-1],
                          jnp.dtype(q.dtype).itemsize, _util.shared_memory_budget())
