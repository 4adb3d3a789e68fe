"""Selected-block attention in Pallas (Triton lowering), forward and backward: the
custom VJP and the public entry.

NSA paper (arXiv 2502.11089) §3.3.2, Eq. 10-12 (attention over the selected
blocks) and §3.4 "Kernel Design" (group-centric loading); SPEC §3 "Selected
attention". Reference: `nsa_jax.ops.selected.selected_attention_xla`. The pieces:
`selected_tiles.py` (tiles, geometry), `selected_plan.py` (index planning in XLA),
`selected_kernels.py` (kernels, pallas_calls), `selected_choice.py` (which tiling
runs); their measurements: experiments/PERF_NOTES.md, "Measurements behind the code's defaults".

Forward. One program takes a *query tile*: `Bq` consecutive tokens of one KV
group, with all G query heads of the group, i.e. M = Bq * G rows (paper §3.4:
all heads of a group share one selection, so they share every K/V load). It
loops over the *union* of the blocks its Bq tokens selected (built in XLA by
sorting and de-duplicating the tile's Bq * n indices) and masks, per row, the
blocks that row's token did not select and the keys after it (causality). A
block wanted by several neighbouring tokens is thus read once per tile, not
once per token. Softmax is online, in float32, in base 2.

Tile width (`Tiles.rows`): a narrow tile (16 rows: one token when G = 16) reads
no block its token did not choose; a wide one (64 rows) shares each load among
more tokens but reads the union of their choices, a win only where neighbouring
tokens choose much alike (not so on random inputs, nor on a trained model's).

Backward (recomputes p from the saved log-sum-exp):
- dQ: the forward's access pattern, per query tile.
- dK/dV: an inverted index. For every KV block, the query tiles whose union
  holds it (a stable sort in XLA), cut into chunks of at most
  `Tiles.dkv_tiles` tiles; one program per chunk accumulates the block's dK
  and dV in registers and adds them into a float32 buffer with atomics. Each
  step gathers several listed tiles at once (`Tiles.dkv_rows` rows: eight
  narrow tiles), so that the dK/dV matmuls, whose inner dimension is the
  number of query rows, are not 16 deep.
  Chunking bounds the work of one program: every tile selects block 0 (the
  forced initial block), so its list is T / Bq tiles long. Determinism: with
  `dkv_tiles=None` each block is one chunk, so every element of dK/dV receives
  one atomic add of its value onto zero (besides exact adds of 0.0 from the
  padded rows of a neighbouring block when l' < 16), and the result is
  bitwise deterministic.
  With chunks, blocks whose list is longer than `dkv_tiles` (the forced
  initial block, popular blocks) receive one add per chunk in an unspecified
  order: float32 rounding may differ from run to run. This is the default,
  for load balance; pass `Tiles(dkv_tiles=None)` for reproducible gradients.

Block-major kernels (`Tiles.block_major`; by default for G <= 8, fixed by the
shapes at trace time: `selected_choice.tiling`). A query tile loads each of
its tokens' n blocks, i.e. n * l' * (Dk + Dv) elements per token and group, to
serve G heads: with small G, or tokens that select unlike blocks, K/V traffic
(from L2) bounds it. The block-major kernels turn the loop around: one program
per KV block (or a chunk of its list) loads the block once and walks the
*entries* (token, slot) whose slot selected it (an inverted index sorted in
XLA, `selected_plan.entry_index`), gathering C = rows // G entries' G query
rows a step:
- forward: each entry's attention over its one block, normalised, and its
  log-sum-exp, stored per entry; XLA merges the n entries of a token
  (`selected_plan.merge`). Memory: n times the output (q.dtype) and its lse,
  transient.
- backward: the dK/dV kernel over entries instead of query tiles, which also
  stores each entry's dQ term (in the input dtype, or float32 with
  `Tiles.block_dq_float32`; n times dQ, transient); XLA sums them in float32.
  No dQ kernel, and no atomics for dQ: every entry's slot is written once.
  dK/dV are added per chunk of `Tiles.block_entries` entries, in any order;
  with dkv_tiles=None each block is one program, and dK/dV (and dQ, whose
  terms are plain stores summed in XLA) are bitwise reproducible, as above.
Traffic per entry: G query rows in, G output rows out, instead of a block of
l' keys and values in: a win when G is small and neighbouring tokens choose
unlike blocks, a loss at G = 16 or when neighbours choose much alike, where
query tiles share loads.

Inputs are padded in XLA where the kernels need powers of two: the group size
G, the head dims (>= 16), n, and T (to whole tiles and blocks). The padding is
a no-op for the paper's shapes with T a multiple of 64 and Dk = Dv = 128.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _util
from pallas_kernels.selected_choice import (QUERY_TILES, fit_tiles_for, shared_memory_reason,
                                             tiling)
from pallas_kernels.selected_kernels import backward_dkv, backward_dq, block_forward, forward
from pallas_kernels.selected_plan import (entry_index, inverted_index, merge, pad_blk,
                                          plan_index, slots)
from pallas_kernels.selected_tiles import Geometry, Tiles, default_tiles


def _pad_qkv(q, k, v, geo: Geometry):
  B, T, HKV = geo.B, geo.T, geo.HKV
  q5 = _util.pad_to(q.reshape(B, T, HKV, geo.G, geo.Dk), (B, geo.Tq, HKV, geo.Gp, geo.Dkp))
  return q5, _util.pad_to(k, (B, geo.Tk, HKV, geo.Dkp)), _util.pad_to(v, (B, geo.Tk, HKV, geo.Dvp))


def _unpad(x5, geo: Geometry, D: int):
  """[B, Tq, HKV, Gp, Dp] -> [B, T, HQ, D]."""
  x = x5[:, :geo.T, :, :geo.G, :D]
  return x.reshape(geo.B, geo.T, geo.HKV * geo.G, D)


def _forward_pass(q, k, v, block_idx, q_offset, geo: Geometry):
  """o [B, T, HQ, Dv], its base-2 lse [B, T, HKV, Gp] and the index (`plan_index`)
  by the tiling `geo`."""
  blk, index = plan_index(block_idx, q_offset, geo)
  q5, kp, vp = _pad_qkv(q, k, v, geo)
  if geo.tiles.block_major:
    o5, lse = merge(*block_forward(q5, kp, vp, blk, q_offset, *index, geo), blk, geo)
  else:
    o5, lse = forward(q5, kp, vp, blk, q_offset, *index, geo)
  return _unpad(o5, geo, geo.Dv), lse[:, :geo.T], index


def _backward_pass(q, k, v, block_idx, q_offset, index, o, lse, do, geo: Geometry):
  """dq, dk, dv by the tiling `geo`, p recomputed from the forward's lse."""
  blk = pad_blk(block_idx, q_offset, geo)
  q5, kp, vp = _pad_qkv(q, k, v, geo)
  B, T, HKV, G = geo.B, geo.T, geo.HKV, geo.G
  rows = (B, geo.Tq, HKV, geo.Gp)
  do5 = _util.pad_to(do.reshape(B, T, HKV, G, geo.Dv), rows + (geo.Dvp,))
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta, lse = _util.pad_to(delta.reshape(B, T, HKV, G), rows), _util.pad_to(lse, rows)
  if geo.tiles.block_major:
    # dkv_tiles=None: one program per block, as in the query-tile dK/dV.
    entries, items = index if geo.tiles.dkv_tiles else entry_index(blk, geo, None)
    dk, dv, dq_part = backward_dkv(q5, kp, vp, blk, q_offset, do5, lse, delta, entries,
                                    items, geo, block_major=True)
    dq5 = jnp.sum(slots(dq_part, blk, geo), axis=2, dtype=jnp.float32).astype(q5.dtype)
  else:
    dq5 = backward_dq(q5, kp, vp, blk, q_offset, *index, do5, lse, delta, geo)
    tiles, items = inverted_index(*index, geo)
    dk, dv = backward_dkv(q5, kp, vp, blk, q_offset, do5, lse, delta, tiles, items, geo,
                           block_major=False)
  dk = dk[:, :geo.S, :, :geo.Dk].astype(kp.dtype)
  dv = dv[:, :geo.S, :, :geo.Dv].astype(vp.dtype)
  return _unpad(dq5, geo, geo.Dk), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _selected(q, k, v, block_idx, q_offset, geo: Geometry):
  """Selected attention by the tiling `geo` (`selected_choice.tiling`), forward and
  backward. The tiling's index (`plan_index`: sorts of block_idx) is kept for the
  backward: sorting again there cost most of the backward's overhead at G = 1
  (experiments/PERF_NOTES.md)."""
  return _selected_fwd(q, k, v, block_idx, q_offset, geo)[0]


def _selected_fwd(q, k, v, block_idx, q_offset, geo):
  o, lse, index = _util.saved(_forward_pass(q, k, v, block_idx, q_offset, geo))
  return o, (q, k, v, block_idx, q_offset, index, o, lse)


def _selected_bwd(geo, res, do):
  dq, dk, dv = _backward_pass(*res, do, geo)
  return dq, dk, dv, None, None


_selected.defvjp(_selected_fwd, _selected_bwd)


def unsupported(q, k, v, *, block: int) -> str | None:
  """Why the kernels cannot take these (validated) inputs, or None: a dtype they do
  not take, or heads too wide for even the smallest narrow tiles' shared memory."""
  if why := _util.dtype_unsupported(q.dtype):
    return why
  narrow = dataclasses.replace(default_tiles(q, v), block_major=False)
  if fit_tiles_for(q, v, block, narrow, QUERY_TILES) is None:
    return shared_memory_reason(q, v, block)
  return None


def selected_attention(q, k, v, block_idx, *, block: int, scale: float,
                       interpret: bool, tiles: Tiles | None = None, q_offset=None):
  """Selected-block attention (the op `nsa_jax.selected_attention`, impl="pallas").

  Args:
    q: [B, T, HQ, Dk]; k, v: [B, S, HKV, Dk], [B, S, HKV, Dv] (float32, bf16
      or f16; accumulation is float32); S = T unless q is a slice of the queries.
    block_idx: [B, T, HKV, n] int32, distinct block indices or -1; order free.
    block: l', tokens per selection block; scale: logit scale;
    interpret: run the kernels in Pallas interpret mode (CPU).
    tiles: tile sizes and launch parameters (default: `selected_tiles.default_tiles`).
    q_offset: int32 scalar (may be traced, e.g. under `shard_map` for context
      parallelism), the position of query row 0 among the S keys: its causal mask
      reads key <= q_offset + t; None: 0.

  Returns:
    o [B, T, HQ, Dv] in q.dtype; rows that see no key get 0. Differentiable
    in q, k, v (custom VJP); block_idx gets no gradient.
  """
  tiles = default_tiles(q, v) if tiles is None else tiles
  block_idx = block_idx.astype(jnp.int32)
  q_offset = jnp.reshape(jnp.asarray(0 if q_offset is None else q_offset, jnp.int32), (1,))
  return _selected(q, k, v, block_idx, q_offset,
                   tiling(q, v, block_idx, block, scale, interpret, tiles))
