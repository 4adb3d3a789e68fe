"""Which selected-attention tiling runs a call: query tiles or block-major, fixed by the
shapes at trace time (`tiling`), with tiles fitted to the device's shared memory (the
measurements behind the rule: experiments/PERF_NOTES.md, "Measurements behind the
code's defaults").
"""
from __future__ import annotations

import dataclasses

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

QUERY_TILES = ("fwd", "dq", "dkv")        # the kernels of each tiling (`shared_memory`)
BLOCK_MAJOR = ("block_fwd", "block_dkv")


def block_major_bytes(geo: Geometry, dtype) -> int:
  """Transient bytes of the block-major kernels over inputs of `dtype`: n x the output
  and its float32 lse in the forward, n x dQ (`dq_dtype`) in the backward."""
  entries = geo.B * geo.Tq * geo.n_pad * geo.HKV * geo.Gp
  return entries * max(geo.Dvp * jnp.dtype(dtype).itemsize + 4,
                       geo.Dkp * dq_dtype(geo.tiles, dtype).itemsize)


def tiling(q, v, block_idx, block: int, scale, interpret, tiles: Tiles) -> Geometry:
  """The one tiling that runs this call, with its tiles fitted to the device's
  shared memory (`fit_tiles`); only its kernels are compiled.

  `tiles.block_major` None: block-major where G <= BLOCK_MAJOR_MAX_GROUP and its
  tiles fit, else query tiles of `tiles.rows` rows; True or False: that tiling (a
  ValueError where its smallest tiles do not fit). Block-major runs in the passes
  of `in_passes` (the Geometry's B and HKV are one pass's).
  """
  make = lambda t: Geometry.make(q, v, block_idx, block, scale, interpret, t)
  query = lambda: make(_must_fit(fit_tiles_for(
      q, v, block, dataclasses.replace(tiles, block_major=False), QUERY_TILES), q, v, block))
  if tiles.block_major is False:
    return query()
  fitted = fit_tiles_for(q, v, block, dataclasses.replace(tiles, block_major=True), BLOCK_MAJOR)
  if tiles.block_major:
    return in_passes(make(_must_fit(fitted, q, v, block)), q.dtype)
  if fitted is None or make(fitted).Gp > BLOCK_MAJOR_MAX_GROUP:
    return query()
  return in_passes(make(fitted), q.dtype)


def in_passes(geo: Geometry, dtype) -> Geometry:
  """geo for one block-major pass: the most (batch row, KV head) units whose transient
  buffers fit `Tiles.block_pass_bytes`, at least one, spread evenly over the passes (a
  pass's batch holds its units, one KV head each); geo itself where one pass takes all.
  Units split no work: a pass reads only its units' keys and writes their dK and dV."""
  unit = block_major_bytes(dataclasses.replace(geo, B=1, HKV=1), dtype)
  units = geo.B * geo.HKV
  passes = _util.cdiv(units, max(1, geo.tiles.block_pass_bytes // unit))
  if passes == 1:
    return geo
  return dataclasses.replace(geo, B=_util.cdiv(units, passes), HKV=1)


def fit_tiles_for(q, v, block: int, tiles: Tiles, kernels: tuple[str, ...]) -> Tiles | None:
  """`fit_tiles` for the kernels of one tiling over q [B, T, HQ, Dk], v [B, T, HKV, Dv]
  on the default device."""
  return fit_tiles(tiles, kernels, q.shape[2] // v.shape[2], q.shape[-1], v.shape[-1],
                   block, jnp.dtype(q.dtype).itemsize, _util.shared_memory_budget())


def _must_fit(tiles: Tiles | None, q, v, block: int) -> Tiles:
  if tiles is None:
    raise ValueError(shared_memory_reason(q, v, block))
  return tiles


def shared_memory_reason(q, v, block: int, kernels: tuple[str, ...] = QUERY_TILES) -> str:
  """Why no tiles of `kernels` fit: the smallest tiles' need against the device's budget."""
  least = Tiles(**FEWEST_ROWS)
  G, Dk, Dv = q.shape[2] // v.shape[2], q.shape[-1], v.shape[-1]
  need = shared_memory(least, G, Dk, Dv, block, jnp.dtype(q.dtype).itemsize)
  return (f"even the smallest tiles ({FEWEST_ROWS}) need {max(need[k] for k in kernels)} "
          f"bytes of shared memory per program for Dk={Dk}, Dv={Dv}, G={G}, "
          f"select_block={block}, {jnp.dtype(q.dtype).name}; the device has "
          f"{_util.shared_memory_budget()}")
