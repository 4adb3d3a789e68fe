"""Which selected-attention tiling runs a call: query tiles or block-major, fixed by the
shapes at trace time (`tiling`), with tiles fitted to the device's shared memory (the
measurements behind the rule: experiments/PERF_NOTES.md, "Measurements behind the
code's defaults").
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import _util
from pallas_kernels.selected_attention.tiles import (FEWEST_ROWS, Geometry, Tiles, dq_dtype,
                                                     fit_tiles, shared_memory)

# Block-major runs by default for groups of at most this many query heads per KV
# head (G padded to a power of 2): per (token, block) entry it moves G query rows in
# and out instead of a block of l' keys and values, which pays at small G; at
# G = 16 the narrow query tile is faster, on random and on a trained model's
# selections alike.
BLOCK_MAJOR_MAX_GROUP = 8
# ... and only when its transient buffers take at most this share of the device's
# memory: half keeps one 64k sequence of Config A's heads at any G on an H200 and
# leaves out two.
BLOCK_MAJOR_MEMORY_SHARE = 0.5

QUERY_TILES = ("fwd", "dq", "dkv")        # the kernels of each tiling (`shared_memory`)
BLOCK_MAJOR = ("block_fwd", "block_dkv")


def block_major_bytes(geo: Geometry, dtype) -> int:
  """Transient bytes of the block-major kernels over inputs of `dtype`: n x the output
  and its float32 lse in the forward, n x dQ (`dq_dtype`) in the backward."""
  entries = geo.B * geo.Tq * geo.n_pad * geo.HKV * geo.Gp
  return entries * max(geo.Dvp * jnp.dtype(dtype).itemsize + 4,
                       geo.Dkp * dq_dtype(geo.tiles, dtype).itemsize)


def device_memory() -> int | None:
  """Bytes the default device may allocate (None where unknown, as on the CPU)."""
  return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


def tiling(q, v, block_idx, block: int, scale, interpret, tiles: Tiles) -> Geometry:
  """The one tiling that runs this call, with its tiles fitted to the device's
  shared memory (`fit_tiles`); only its kernels are compiled.

  `tiles.block_major` None: block-major where G <= BLOCK_MAJOR_MAX_GROUP, its
  tiles fit and its transient buffers fit BLOCK_MAJOR_MEMORY_SHARE of the
  device's memory (at G = 1, HQ = 64, T = 64k, bf16: ~17 GB per sequence), else
  query tiles of `tiles.rows` rows; True or False: that tiling (a ValueError
  where its smallest tiles do not fit).
  """
  make = lambda t: Geometry.make(q, v, block_idx, block, scale, interpret, t)
  query = lambda: make(_must_fit(fit_tiles_for(
      q, v, block, dataclasses.replace(tiles, block_major=False), QUERY_TILES), q, v, block))
  if tiles.block_major is False:
    return query()
  fitted = fit_tiles_for(q, v, block, dataclasses.replace(tiles, block_major=True), BLOCK_MAJOR)
  if tiles.block_major:
    return make(_must_fit(fitted, q, v, block))
  if fitted is None:
    return query()
  geo, memory = make(fitted), device_memory()
  too_big = memory is not None and (block_major_bytes(geo, q.dtype)
                                    > BLOCK_MAJOR_MEMORY_SHARE * memory)
  return query() if geo.Gp > BLOCK_MAJOR_MAX_GROUP or too_big else geo


def fit_tiles_for(q, v, block: int, tiles: Tiles, kernels: tuple[str, ...]) -> Tiles | None:
  """`fit_tiles` for the kernels of one tiling over q [B, T, HQ, Dk], v [B, T, HKV, Dv]
  on the default device."""
  return fit_tiles(tiles, kernels, q.shape[2] // v.shape[2], q.shape[-1], v.shape[-1],
                   block, jnp.dtype(q.dtype).itemsize, _util.shared_memory_budget())


def _must_fit(tiles: Tiles | None, q, v, block: int) -> Tiles:
  if tiles is None:
    raise ValueError(shared_memory_reason(q, v, block))
  return tiles


def shared_memory_reason(q, v, block: int) -> str:
  """Why no tiles fit: the smallest tiles' need against the device's budget."""
  least = Tiles(**FEWEST_ROWS)
  G, Dk, Dv = q.shape[2] // v.shape[2], q.shape[-1], v.shape[-1]
  need = shared_memory(least, G, Dk, Dv, block, jnp.dtype(q.dtype).itemsize)
  return (f"even the smallest tiles ({FEWEST_ROWS}) need {max(need[k] for k in QUERY_TILES)} "
          f"bytes of shared memory per program for Dk={Dk}, Dv={Dv}, G={G}, "
          f"select_block={block}, {jnp.dtype(q.dtype).name}; the device has "
          f"{_util.shared_memory_budget()}")
