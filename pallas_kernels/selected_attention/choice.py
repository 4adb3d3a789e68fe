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
# ... and only when one batch row's transient buffers take at most this share of the
# device's memory (a batch runs in passes: `block_major_rows`): half keeps one 64k
# sequence of Config A's heads at any G on an H200.
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
  tiles fit and one batch row's transient buffers fit BLOCK_MAJOR_MEMORY_SHARE of
  the device's memory (at G = 1, HQ = 64, T = 64k, bf16: ~17 GB per sequence), else
  query tiles of `tiles.rows` rows; True or False: that tiling (a ValueError
  where its smallest tiles do not fit). Block-major runs the batch in passes of
  `block_major_rows` rows (the Geometry's B).
  """
  make = lambda t: Geometry.make(q, v, block_idx, block, scale, interpret, t)
  query = lambda: make(_must_fit(fit_tiles_for(
      q, v, block, dataclasses.replace(tiles, block_major=False), QUERY_TILES), q, v, block))
  if tiles.block_major is False:
    return query()
  fitted = fit_tiles_for(q, v, block, dataclasses.replace(tiles, block_major=True), BLOCK_MAJOR)
  if tiles.block_major:
    geo = make(_must_fit(fitted, q, v, block))
    return dataclasses.replace(geo, B=block_major_rows(geo, q.dtype) or 1)
  if fitted is None:
    return query()
  geo = make(fitted)
  rows = None if geo.Gp > BLOCK_MAJOR_MAX_GROUP else block_major_rows(geo, q.dtype)
  return query() if rows is None else dataclasses.replace(geo, B=rows)


def block_major_rows(geo: Geometry, dtype) -> int | None:
  """Batch rows per block-major pass: the most rows dividing geo.B whose transient
  buffers fit `Tiles.block_pass_bytes` (at least 1); None where one row's exceed
  BLOCK_MAJOR_MEMORY_SHARE of the device's memory (then query tiles run)."""
  one_row = block_major_bytes(dataclasses.replace(geo, B=1), dtype)
  memory = device_memory()
  if memory is not None and one_row > BLOCK_MAJOR_MEMORY_SHARE * memory:
    return None
  fits = max(1, geo.tiles.block_pass_bytes // one_row)
  return max(r for r in range(1, geo.B + 1) if geo.B % r == 0 and r <= fits)


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
