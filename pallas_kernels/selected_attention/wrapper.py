"""Selected-block attention in Pallas (Triton lowering), forward and backward: the
custom VJP and the public entry (paper §3.3.2, Eq. 10-12, and §3.4's group-centric loading).

Two tilings, fixed by the shapes at trace time (`choice.tiling`): *query tiles*
(one program per Bq tokens x G heads over the union of their selected blocks; dQ alike;
dK/dV per KV block over an inverted index of the tiles that chose it) and, by default for
G <= 8, *block-major* (one program per KV block over the (token, slot) entries that chose
it, forward and dK/dV, partial results merged in XLA). Design, determinism and padding:
docs/kernels.md#selected-attention. The pieces, beside this file: `tiles.py` (tiles,
geometry), `plan.py` (index planning in XLA), `kernels.py` (kernels, pallas_calls),
`choice.py` (which tiling runs). Reference:
`nsa_jax.ops.selected.selected_attention_xla`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _util
from pallas_kernels.selected_attention.choice import (BLOCK_MAJOR, QUERY_TILES, fit_tiles_for,
                                                      shared_memory_reason, tiling)
from pallas_kernels.selected_attention.kernels import (backward_dkv, backward_dq, block_forward,
                                                       forward)
from pallas_kernels.selected_attention.plan import (entry_index, inverted_index, merge, pad_blk,
                                                    plan_index, slots)
from pallas_kernels.selected_attention.tiles import Geometry, Tiles, default_tiles


def _pad_qkv(q, k, v, geo: Geometry):
  B, T, HKV = geo.B, geo.T, geo.HKV
  q5 = _util.pad_to(q.reshape(B, T, HKV, geo.G, geo.Dk), (B, geo.Tq, HKV, geo.Gp, geo.Dkp))
  return q5, _util.pad_to(k, (B, geo.Tk, HKV, geo.Dkp)), _util.pad_to(v, (B, geo.Tk, HKV, geo.Dvp))


def _unpad(x5, geo: Geometry, D: int):
  """[B, Tq, HKV, Gp, Dp] -> [B, T, HQ, D]."""
  x = x5[:, :geo.T, :, :geo.G, :D]
  return x.reshape(geo.B, geo.T, geo.HKV * geo.G, D)


def _entry_bias(bias, geo: Geometry):
  """A score bias per slot [B, T, HKV, n] -> per block-major entry and head [B, E, HKV, Gp]
  float32 (entry e = token * n_pad + slot, `plan.entry_index`)."""
  b = _util.pad_to(bias.astype(jnp.float32), (geo.B, geo.Tq, geo.HKV, geo.n_pad))
  b = jnp.swapaxes(b, 2, 3).reshape(geo.B, geo.Tq * geo.n_pad, geo.HKV, 1)
  return jnp.broadcast_to(b, b.shape[:3] + (geo.Gp,))


def _slot_grad(dbias_part, blk, bias, geo: Geometry):
  """The bias's gradient [B, T, HKV, n] from the entries' [B, E, HKV, Gp] terms (heads
  summed; 0 in slots no entry listed)."""
  g = jnp.sum(slots(dbias_part, blk, geo), axis=-1)               # [B, Tq, n_pad, HKV]
  return jnp.swapaxes(g, 2, 3)[:, :geo.T, :, :bias.shape[-1]].astype(bias.dtype)


def _forward_pass(q, k, v, block_idx, bias, q_offset, geo: Geometry):
  """o [B, T, HQ, Dv], its base-2 lse [B, T, HKV, Gp] and the index (`plan_index`)
  by the tiling `geo`; bias (block-major only): None or a score bias per slot."""
  blk, index = plan_index(block_idx, q_offset, geo)
  q5, kp, vp = _pad_qkv(q, k, v, geo)
  if geo.tiles.block_major:
    bias5 = None if bias is None else _entry_bias(bias, geo)
    o5, lse = merge(*block_forward(q5, kp, vp, blk, q_offset, *index, geo, bias5), blk, geo)
  else:
    o5, lse = forward(q5, kp, vp, blk, q_offset, *index, geo)
  return _unpad(o5, geo, geo.Dv), lse[:, :geo.T], index


def _backward_pass(q, k, v, block_idx, bias, q_offset, index, o, lse, do, geo: Geometry):
  """dq, dk, dv (float32) and the bias's gradient (None without one) by the tiling
  `geo`, p recomputed from the forward's lse."""
  blk = pad_blk(block_idx, q_offset, geo)
  q5, kp, vp = _pad_qkv(q, k, v, geo)
  B, T, HKV, G = geo.B, geo.T, geo.HKV, geo.G
  rows = (B, geo.Tq, HKV, geo.Gp)
  do5 = _util.pad_to(do.reshape(B, T, HKV, G, geo.Dv), rows + (geo.Dvp,))
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta, lse = _util.pad_to(delta.reshape(B, T, HKV, G), rows), _util.pad_to(lse, rows)
  dbias = None
  if geo.tiles.block_major:
    # dkv_tiles=None: one program per block, as in the query-tile dK/dV.
    entries, items = index if geo.tiles.dkv_tiles else entry_index(blk, geo, None)
    bias5 = None if bias is None else _entry_bias(bias, geo)
    dk, dv, dq_part, *dbias_part = backward_dkv(q5, kp, vp, blk, q_offset, do5, lse, delta,
                                                entries, items, geo, block_major=True,
                                                bias=bias5)
    dq5 = jnp.sum(slots(dq_part, blk, geo), axis=2, dtype=jnp.float32).astype(q5.dtype)
    if dbias_part:
      dbias = _slot_grad(dbias_part[0], blk, bias, geo)
  else:
    dq5 = backward_dq(q5, kp, vp, blk, q_offset, *index, do5, lse, delta, geo)
    tiles, items = inverted_index(*index, geo)
    dk, dv = backward_dkv(q5, kp, vp, blk, q_offset, do5, lse, delta, tiles, items, geo,
                           block_major=False)
  return _unpad(dq5, geo, geo.Dk), dk[:, :geo.S, :, :geo.Dk], dv[:, :geo.S, :, :geo.Dv], dbias


def _passes(q, k, geo: Geometry) -> int:
  """How many block-major passes `geo` runs (`choice.in_passes`)."""
  B, HKV = q.shape[0], k.shape[2]
  return 1 if (geo.B, geo.HKV) == (B, HKV) else _util.cdiv(B * HKV, geo.B)


def _to_units(x, HKV: int, passes: int):
  """[B, T, HKV * m, ...] -> [passes, U, T, m, ...]: one (batch row, KV head) per unit,
  padded to passes x U units (integers with -1: no block) for a `lax.map` over passes."""
  B, T, H = x.shape[:3]
  x = jnp.moveaxis(x.reshape(B, T, HKV, H // HKV, *x.shape[3:]), 2, 1)
  x = x.reshape(B * HKV, *x.shape[2:])
  U = _util.cdiv(B * HKV, passes)
  fill = -1 if jnp.issubdtype(x.dtype, jnp.integer) else 0
  return _util.pad_to(x, (passes * U,) + x.shape[1:], fill).reshape(passes, U, *x.shape[1:])


def _from_units(y, B: int, HKV: int):
  """[passes, U, T, m, ...] -> [B, T, HKV * m, ...]: the inverse of `_to_units`."""
  y = y.reshape(-1, *y.shape[2:])[:B * HKV]
  y = jnp.moveaxis(y.reshape(B, HKV, *y.shape[1:]), 1, 2)
  return y.reshape(B, y.shape[1], HKV * y.shape[3], *y.shape[4:])


def _in_units(xs, HKV: int, passes: int):
  """`_to_units` of each array of xs (None stays None)."""
  return tuple(None if x is None else _to_units(x, HKV, passes) for x in xs)


def _forward(q, k, v, block_idx, bias, q_offset, geo: Geometry):
  """`_forward_pass` in the passes of `choice.in_passes`, one after the other; the
  index stays [passes, ...]."""
  passes = _passes(q, k, geo)
  if passes == 1:
    return _forward_pass(q, k, v, block_idx, bias, q_offset, geo)
  B, HKV = q.shape[0], k.shape[2]
  o, lse, index = lax.map(lambda xs: _forward_pass(*xs, q_offset, geo),
                          _in_units((q, k, v, block_idx, bias), HKV, passes))
  return _from_units(o, B, HKV), _from_units(lse, B, HKV), index


def _backward(q, k, v, block_idx, bias, q_offset, index, o, lse, do, geo: Geometry):
  """`_backward_pass` in the passes of `_forward`: each writes its own units' dK and dV
  (and bias gradient)."""
  def one(q, k, v, block_idx, bias, o, lse, do, index):
    dq, dk, dv, dbias = _backward_pass(q, k, v, block_idx, bias, q_offset, index, o, lse,
                                       do, geo)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), dbias

  passes = _passes(q, k, geo)
  if passes == 1:
    return one(q, k, v, block_idx, bias, o, lse, do, index)
  B, HKV = q.shape[0], k.shape[2]
  units = _in_units((q, k, v, block_idx, bias, o, lse, do), HKV, passes)
  grads = lax.map(lambda xs: one(*xs), units + (index,))
  return tuple(None if g is None else _from_units(g, B, HKV) for g in grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _selected(q, k, v, block_idx, bias, q_offset, geo: Geometry):
  """Selected attention by the tiling `geo` (`choice.tiling`), forward and
  backward; bias: None or a score bias per slot (block-major only). The tiling's
  index (`plan_index`: sorts of block_idx) is kept for the backward: sorting again
  there cost most of the backward's overhead at G = 1 (experiments/PERF_NOTES.md)."""
  return _selected_fwd(q, k, v, block_idx, bias, q_offset, geo)[0]


def _selected_fwd(q, k, v, block_idx, bias, q_offset, geo):
  o, lse, index = _util.saved(_forward(q, k, v, block_idx, bias, q_offset, geo))
  return o, (q, k, v, block_idx, bias, q_offset, index, o, lse)


def _selected_bwd(geo, res, do):
  dq, dk, dv, dbias = _backward(*res, do, geo)
  return dq, dk, dv, None, dbias, None


_selected.defvjp(_selected_fwd, _selected_bwd)


def unsupported(q, k, v, *, block: int, biased: bool = False) -> str | None:
  """Why the kernels cannot take these (validated) inputs, or None: a dtype they do
  not take, or heads too wide for even the smallest narrow tiles' shared memory (with
  a score bias: the block-major tiles', the one tiling that takes a bias)."""
  if why := _util.dtype_unsupported(q.dtype):
    return why
  if biased:
    tiles = dataclasses.replace(default_tiles(q, v), block_major=True)
    if fit_tiles_for(q, v, block, tiles, BLOCK_MAJOR) is None:
      return "with a block_bias: " + shared_memory_reason(q, v, block, BLOCK_MAJOR)
    return None
  narrow = dataclasses.replace(default_tiles(q, v), block_major=False)
  if fit_tiles_for(q, v, block, narrow, QUERY_TILES) is None:
    return shared_memory_reason(q, v, block)
  return None


def selected_attention(q, k, v, block_idx, *, block: int, scale: float,
                       interpret: bool, tiles: Tiles | None = None, q_offset=None,
                       block_bias=None):
  """Selected-block attention (the op `nsa_jax.selected_attention`, impl="pallas").

  Args:
    q: [B, T, HQ, Dk]; k, v: [B, S, HKV, Dk], [B, S, HKV, Dv] (float32, bf16
      or f16; accumulation is float32); S = T unless q is a slice of the queries.
    block_idx: [B, T, HKV, n] int32, distinct block indices or -1; order free.
    block: l', tokens per selection block; scale: logit scale;
    interpret: run the kernels in Pallas interpret mode (CPU).
    tiles: tile sizes and launch parameters (default: `tiles.default_tiles`).
    q_offset: int32 scalar (may be traced, e.g. under `shard_map` for context
      parallelism), the position of query row 0 among the S keys: its causal mask
      reads key <= q_offset + t; None: 0.
    block_bias: None or [B, T, HKV, n] float, added (natural-log units) to the scores
      of the keys of each slot's block: the straight-through gate
      (docs/selection_learning.md#straight-through-gate). It runs block-major, for any G.

  Returns:
    o [B, T, HQ, Dv] in q.dtype; rows that see no key get 0. Differentiable
    in q, k, v and block_bias (custom VJP); block_idx gets no gradient.
  """
  tiles = default_tiles(q, v) if tiles is None else tiles
  if block_bias is not None:
    tiles = dataclasses.replace(tiles, block_major=True)
  block_idx = block_idx.astype(jnp.int32)
  q_offset = jnp.reshape(jnp.asarray(0 if q_offset is None else q_offset, jnp.int32), (1,))
  return _selected(q, k, v, block_idx, block_bias, q_offset,
                   tiling(q, v, block_idx, block, scale, interpret, tiles))
