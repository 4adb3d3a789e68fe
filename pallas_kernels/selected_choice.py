"""Which selected-attention tiling runs a call: narrow or wide query tiles, or
block-major, by a cost estimated from block_idx (`tilings`), and the constants
of that estimate (their measurements:
experiments/PERF_NOTES.md, "Measurements behind the code's defaults").
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.selected_plan import distinct, listed, pad_blk
from pallas_kernels import _util
from pallas_kernels.selected_tiles import FEWEST_ROWS, Geometry, Tiles, fit_tiles, shared_memory


# Estimated cost of each tiling, in narrow-tile block loads per token and KV
# head, from block_idx (the measurements behind each constant:
# experiments/PERF_NOTES.md, "Measurements behind the code's defaults"):
# - narrow: the blocks its tiles read per token (`blocks_per_token`);
# - wide: WIDE_TILE_COST x the blocks its tiles read per token: a wide tile's
#   program costs about this many narrow ones per block it reads;
# - block-major: (BLOCK_MAJOR_ENTRY_COST + BLOCK_MAJOR_ROW_COST x G) x the
#   (token, block) entries per token: its work is G query rows per entry,
#   whatever neighbours choose.
WIDE_TILE_COST = 2.5
BLOCK_MAJOR_ENTRY_COST = 0.06
BLOCK_MAJOR_ROW_COST = 0.065
SAMPLED_TILES = 64
# Block-major is offered only when its transient buffers take at most this
# share of the device's memory: every compiled branch's buffers count towards
# a program's peak memory, chosen or not. Half keeps one 64k sequence of
# Config A's heads at any G on an H200 and leaves out two.
BLOCK_MAJOR_MEMORY_SHARE = 0.5


def blocks_per_token(blk, geo: Geometry):
  """Estimated blocks a query tiling reads per token and KV head: the mean
  union of SAMPLED_TILES evenly spaced tiles per (sequence, head), over Bq.
  (A sample, as the unions of all tiles cost sorts of Bq * n indices per tile,
  for every tiling compiled when only one runs.)"""
  stride = max(1, geo.nT // SAMPLED_TILES)
  tiles = blk.reshape(geo.B, geo.nT, geo.Bq, geo.HKV, geo.n_pad)[:, ::stride]
  _, keep = distinct(tiles.reshape(geo.B, -1, geo.HKV, geo.n_pad), geo)
  return jnp.mean(jnp.sum(keep, axis=-1, dtype=jnp.float32)) / geo.Bq


def block_major_bytes(geo: Geometry, itemsize: int) -> int:
  """Transient bytes of the block-major kernels: n x the output (q.dtype) and
  its float32 lse in the forward, n x dQ (float32) in the backward."""
  entries = geo.B * geo.Tq * geo.n_pad * geo.HKV * geo.Gp
  return entries * max(geo.Dvp * itemsize + 4, geo.Dkp * 4)


def device_memory() -> int | None:
  """Bytes the default device may allocate (None where unknown, as on the CPU)."""
  return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


class Tiling(NamedTuple):
  """One way to run the kernels (`_forward_pass`, `_backward_pass`), at ~cost."""
  name: str               # "narrow", "wide" or "block-major"
  geo: Geometry
  cost: jax.Array         # float32 scalar, see WIDE_TILE_COST


def tilings(q, v, block_idx, block: int, scale, interpret, tiles: Tiles) -> list[Tiling]:
  """The tilings `tiles` allows for this call, with their estimated costs.

  Each tiling's tiles are fitted to the device's shared memory (`fit_tiles`); a
  tiling that does not fit is left out (the narrow one must fit: `unsupported`).
  Block-major is offered only when it can win: its cost per entry must be
  below the narrow tile's at most one block load per entry (G <= 8), so
  G = 16 compiles no block-major kernels; and only when its transient
  buffers fit BLOCK_MAJOR_MEMORY_SHARE of the device's memory (at G = 1,
  HQ = 64, T = 64k, bf16: 34 GB per sequence; `Tiles(block_major=True)`
  runs it regardless).
  """
  fitted = functools.partial(fit_tiles_for, q, v, block)
  make = lambda t: Geometry.make(q, v, block_idx, block, scale, interpret, t)
  if tiles.block_major:
    return [Tiling("block-major", make(_must_fit(fitted(tiles, BLOCK_MAJOR), q, v, block)),
                   jnp.zeros((), jnp.float32))]
  narrow = make(_must_fit(fitted(dataclasses.replace(tiles, block_major=False), QUERY_TILES),
                          q, v, block))
  per_token = lambda geo: blocks_per_token(pad_blk(block_idx, geo), geo)
  options = [Tiling("narrow", narrow, per_token(narrow))]
  wide_tiles = tiles.wide_rows and fitted(dataclasses.replace(
      tiles, block_major=False, rows=tiles.wide_rows, wide_rows=None,
      num_warps=tiles.wide_num_warps), QUERY_TILES)
  if wide_tiles and wide_tiles.rows > narrow.tiles.rows:
    wide = make(wide_tiles)
    if wide.Bq > narrow.Bq:                # else G fills both with one token
      options.append(Tiling("wide", wide, WIDE_TILE_COST * per_token(wide)))
  per_entry = BLOCK_MAJOR_ENTRY_COST + BLOCK_MAJOR_ROW_COST * narrow.Gp
  block_tiles = fitted(dataclasses.replace(tiles, block_major=True), BLOCK_MAJOR)
  if tiles.block_major is None and per_entry < 1 and block_tiles:
    geo = make(block_tiles)
    memory = device_memory()
    if memory is None or (block_major_bytes(geo, q.dtype.itemsize)
                          <= BLOCK_MAJOR_MEMORY_SHARE * memory):
      entries = listed(pad_blk(block_idx, geo), geo)
      options.append(Tiling("block-major", geo, per_entry * jnp.mean(
          jnp.sum(entries, axis=-1, dtype=jnp.float32))))
  return options


QUERY_TILES = ("fwd", "dq", "dkv")        # the kernels of each tiling (`shared_memory`)
BLOCK_MAJOR = ("block_fwd", "block_dkv")


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
