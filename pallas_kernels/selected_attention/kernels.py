"""The selected-attention Pallas kernels (Triton lowering) and their pallas_calls.

Query-tile forward and dQ (`_fwd_kernel`, `_dq_kernel`: one program per tile
of Bq tokens x G heads over the tile's block union), the dK/dV kernel over a
block's work items (`_dkv_kernel`, query tiles or block-major entries), and the
block-major forward (`_block_fwd_kernel`). What they compute and why:
`wrapper.py`; their index: `plan.py`.

Every kernel takes offset_ref [1] int32, the position of query row 0 among the keys
(`selected_attention`'s q_offset, for a slice of the queries): rows are gathered by
their index, and their causal mask reads their position, index + offset.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.selected_attention.tiles import NEG, Geometry, dq_dtype

LOG2E = math.log2(math.e)


def _tokens(i, geo: Geometry):
  """Token indices [Bq] of query tile i."""
  return i * geo.Bq + jnp.arange(geo.Bq, dtype=jnp.int32)


def _rows(blk, tok, geo: Geometry):
  """Token position [N*Gp] and selected blocks [N*Gp, n_pad] of the rows of N tokens.

  tok [N] are the tokens, blk [N, n_pad] their selections; row r is token
  tok[r // Gp], head r % Gp (the tokens' [N, Gp] heads flattened).
  """
  N = tok.shape[0]
  sel = jnp.broadcast_to(blk[:, None, :], (N, geo.Gp, geo.n_pad))
  return _token_rows(tok, geo), sel.reshape(N * geo.Gp, geo.n_pad)


def _token_rows(tok, geo: Geometry):
  """Token position [N*Gp] of the rows of N tokens tok [N] (row r: tok[r // Gp])."""
  return jnp.broadcast_to(tok[:, None], (tok.shape[0], geo.Gp)).reshape(-1)


def _scores(q, k, j, tok, sel, geo: Geometry):
  """Base-2 logits [M, Lb] of the rows against block j, and their visibility.

  A key is visible to a row when the row's token selected block j, the key
  lies in block j (the load holds Lb >= l' keys) and is not after the token.
  sel None: every row's token selected block j (block-major entries).
  """
  visible = _visible(j, tok, geo)
  if sel is not None:
    visible &= (jnp.max(jnp.where(sel == j, 1, 0), axis=1) > 0)[:, None]
  return _logits(q, k, geo), visible


def _logits(q, k, geo: Geometry):
  return plgpu.dot(q, k.T) * (geo.scale * LOG2E)


def _visible(j, tok, geo: Geometry):
  """[M, Lb]: the keys of block j's load that lie in block j, not after each row's token."""
  col = jnp.arange(geo.Lb, dtype=jnp.int32)
  return ((j * geo.lp + col)[None, :] <= tok[:, None]) & (col < geo.lp)[None, :]


def _block(ref, j, geo: Geometry):
  return ref[pl.ds(j * geo.lp, geo.Lb), :]


def _fwd_kernel(q_ref, k_ref, v_ref, blk_ref, offset_ref, union_ref, count_ref,
                o_ref, lse_ref, *, geo: Geometry):
  q = q_ref[...].reshape(geo.M, geo.Dkp)
  tok, sel = _rows(blk_ref[...], offset_ref[0] + _tokens(pl.program_id(0), geo), geo)

  def body(u, carry):
    acc, m, l = carry
    j = union_ref[u]
    v = _block(v_ref, j, geo)
    s, mask = _scores(q, _block(k_ref, j, geo), j, tok, sel, geo)
    m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, NEG), axis=1))
    p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
    alpha = jnp.exp2(m - m_new)
    acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_new, alpha * l + jnp.sum(p, axis=1)

  init = (jnp.zeros((geo.M, geo.Dvp), jnp.float32),
          jnp.full((geo.M,), NEG, jnp.float32), jnp.zeros((geo.M,), jnp.float32))
  acc, m, l = lax.fori_loop(0, count_ref[0], body, init)
  seen = l > 0
  l = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l[:, None]).reshape(geo.Bq, geo.Gp, geo.Dvp).astype(o_ref.dtype)
  # Rows that see nothing keep lse = 0; their p is masked to 0 in the backward.
  lse_ref[...] = jnp.where(seen, m + jnp.log2(l), 0.0).reshape(geo.Bq, geo.Gp)


def _steps(n, index_at, gather, step, init, prefetch: bool):
  """lax.fori_loop over steps 0 .. n-1 of `step(i, index, data, carry)`, where
  index = index_at(i) (loaded ids) and data = gather(index) (rows gathered by
  them); index_at must stay in bounds for every i.

  With `prefetch`, step i + 1's data and step i + 2's ids are loaded before
  step i computes, so that the dependent loads (ids, then the rows they point
  to) overlap the math instead of preceding it: faster for the block-major
  forward, slower for the dK/dV kernel, which gathers q and dO and holds two
  float32 accumulators (experiments/PERF_NOTES.md).
  """
  if not prefetch:
    return lax.fori_loop(
        0, n, lambda i, c: step(i, index_at(i), gather(index_at(i)), c), init)

  def body(i, loop):
    carry, index, data, index_next = loop
    data_next, index_after = gather(index_next), index_at(i + 2)
    return step(i, index, data, carry), index_next, data_next, index_after

  first = index_at(0)
  return lax.fori_loop(0, n, body, (init, first, gather(first), index_at(1)))[0]


def _clamped(hi, count: int, start):
  """Positions start .. start + count - 1 of a list slice ending at hi, past
  its end repeating the last one (0 for an empty slice, whose start is 0)."""
  return jnp.maximum(jnp.minimum(start + jnp.arange(count, dtype=jnp.int32), hi - 1), 0)


def _block_fwd_kernel(q_ref, k_ref, v_ref, offset_ref, entry_ref, item_ref, *refs,
                      geo: Geometry, biased: bool):
  """Each (token, block) entry of work item (block j, entries[lo:hi]): its G rows'
  attention over block j, normalised, and their base-2 lse. biased: refs start with
  bias_ref [E, Gp], a score bias per entry (natural-log units) added to its keys' scores."""
  bias_ref = refs[0] if biased else None
  o_ref, lse_ref = refs[biased:]
  j, lo, hi = item_ref[0], item_ref[1], item_ref[2]
  q0 = offset_ref[0]
  k, v = _block(k_ref, j, geo), _block(v_ref, j, geo)
  C = geo.C                               # entries per step, G rows each

  # Past hi, repeat the last entry: its rows compute the same values again
  # and store them to the same place (no masked stores needed).
  index_at = lambda step: entry_ref[_clamped(hi, C, lo + step * C)]

  def gather(e):
    q = q_ref[e // geo.n_pad].reshape(C * geo.Gp, geo.Dkp)
    return q, (None if bias_ref is None else bias_ref[e].reshape(C * geo.Gp))

  def step(_, e, data, carry):
    q, bias = data
    tok = e // geo.n_pad
    s, mask = _scores(q, k, j, _token_rows(q0 + tok, geo), None, geo)
    s = _biased(s, bias)
    # Every listed entry sees key j * l' (`listed`), so l >= 1.
    m = jnp.max(jnp.where(mask, s, NEG), axis=1)
    p = jnp.where(mask, jnp.exp2(s - m[:, None]), 0.0)
    l = jnp.sum(p, axis=1)
    o = plgpu.dot(p.astype(v.dtype), v) / l[:, None]
    o_ref[e] = o.reshape(C, geo.Gp, geo.Dvp).astype(o_ref.dtype)
    lse_ref[e] = (m + jnp.log2(l)).reshape(C, geo.Gp)
    return carry

  _steps((hi - lo + C - 1) // C, index_at, gather, step, 0, prefetch=True)


def _biased(s, bias):
  """Base-2 scores [rows, Lb] plus each row's bias [rows] (natural-log units), if any."""
  return s if bias is None else s + (bias * LOG2E)[:, None]


def _dq_kernel(q_ref, k_ref, v_ref, blk_ref, offset_ref, union_ref, count_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, geo: Geometry):
  q = q_ref[...].reshape(geo.M, geo.Dkp)
  do = do_ref[...].reshape(geo.M, geo.Dvp)
  lse = lse_ref[...].reshape(geo.M)
  delta = delta_ref[...].reshape(geo.M)
  tok, sel = _rows(blk_ref[...], offset_ref[0] + _tokens(pl.program_id(0), geo), geo)

  def body(u, dq):
    j = union_ref[u]
    k = _block(k_ref, j, geo)
    s, mask = _scores(q, k, j, tok, sel, geo)
    p = jnp.where(mask, jnp.exp2(s - lse[:, None]), 0.0)
    ds = p * (plgpu.dot(do, _block(v_ref, j, geo).T) - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, count_ref[0], body,
                     jnp.zeros((geo.M, geo.Dkp), jnp.float32))
  dq_ref[...] = (dq * geo.scale).reshape(geo.Bq, geo.Gp, geo.Dkp).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, blk_ref, offset_ref, do_ref, lse_ref, delta_ref,
                ids_ref, item_ref, dk_in_ref, dv_in_ref, *refs, geo: Geometry,
                block_major: bool, biased: bool):
  """dK and dV of one work item (block j, ids[lo:hi]); block-major, it also
  stores each (token, block) entry's term of dQ to dq_ref, and biased (refs start
  with bias_ref [E, Gp], as in `_block_fwd_kernel`) each entry's dS summed over the
  block's keys to dbias_ref: the gradient of its bias."""
  del dk_in_ref, dv_in_ref   # aliased with dk_ref, dv_ref (zeros)
  bias_ref = refs[0] if biased else None
  dk_ref, dv_ref, *terms = refs[biased:]
  dq_ref, dbias_ref = (terms + [None, None])[:2]
  j, lo, hi = item_ref[0], item_ref[1], item_ref[2]
  q0 = offset_ref[0]
  k, v = _block(k_ref, j, geo), _block(v_ref, j, geo)
  R = geo.C_bwd if block_major else geo.R     # entries or query tiles per step
  tokens_per_id = 1 if block_major else geo.Bq
  rows = R * tokens_per_id * geo.Gp

  def index_at(step):   # the last step may hold fewer: repeat the last id
    first = lo + step * R
    live = first + jnp.arange(R, dtype=jnp.int32) < hi
    return live, ids_ref[_clamped(hi, R, first)]

  def gather(index):
    _, ids = index
    if block_major:
      tok = ids // geo.n_pad                   # entry e = token * n_pad + slot
    else:
      tok = (ids[:, None] * geo.Bq
             + jnp.arange(geo.Bq, dtype=jnp.int32)[None, :]).reshape(R * geo.Bq)
    # An entry's token chose block j by construction; a tile's tokens may not.
    return (tok, q_ref[tok].reshape(rows, geo.Dkp), do_ref[tok].reshape(rows, geo.Dvp),
            lse_ref[tok].reshape(rows), delta_ref[tok].reshape(rows),
            None if block_major else blk_ref[tok],
            None if bias_ref is None else bias_ref[ids].reshape(rows))

  def step(_, index, data, carry):
    dk, dv = carry
    live, ids = index
    tok, q, do, lse, delta, blk, bias = data
    rows_tok, sel = ((_token_rows(q0 + tok, geo), None) if block_major
                     else _rows(blk, q0 + tok, geo))
    s, mask = _scores(q, k, j, rows_tok, sel, geo)
    p = jnp.where(mask, jnp.exp2(_biased(s, bias) - lse[:, None]), 0.0)
    ds = p * (plgpu.dot(do, v.T) - delta[:, None])
    if block_major:   # repeated entries store the same values to the same place
      dq = plgpu.dot(ds.astype(k.dtype), k) * geo.scale
      dq_ref[ids] = dq.reshape(R, geo.Gp, geo.Dkp).astype(dq_ref.dtype)
    if dbias_ref is not None:
      dbias_ref[ids] = jnp.sum(ds, axis=1).reshape(R, geo.Gp)
    live = jnp.broadcast_to(live[:, None], (R, rows // R)).reshape(rows)[:, None]
    p, ds = jnp.where(live, p, 0.0), jnp.where(live, ds, 0.0)
    dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
    return dk + plgpu.dot(ds.astype(q.dtype).T, q), dv

  dk, dv = _steps((hi - lo + R - 1) // R, index_at, gather, step,
                  (jnp.zeros((geo.Lb, geo.Dkp), jnp.float32),
                   jnp.zeros((geo.Lb, geo.Dvp), jnp.float32)), prefetch=False)
  # Rows past l' belong to block j+1: add exact zeros there (no masked
  # atomics: interpret mode lacks them).
  in_block = (jnp.arange(geo.Lb) < geo.lp)[:, None]
  keys = pl.ds(j * geo.lp, geo.Lb)
  zero = jnp.int32(0)   # int32 like `keys` (interpret mode under x64)

  @pl.when(hi > lo)
  def _():
    plgpu.atomic_add(dk_ref, (keys, pl.ds(zero, geo.Dkp)),
                     jnp.where(in_block, dk * geo.scale, 0.0))
    plgpu.atomic_add(dv_ref, (keys, pl.ds(zero, geo.Dvp)),
                     jnp.where(in_block, dv, 0.0))


# ------------------------------------------------------------ pallas calls


def _tile_specs(geo: Geometry):
  """BlockSpecs of the per-query-tile kernels, grid (nT, HKV, B).

  Tile index fastest, so that neighbouring tiles of one head, which select
  mostly the same blocks, run together and share K/V through L2.
  Returns the per-tile spec maker and the specs of (q, k, v, blk, union, count).
  """
  def per_tile(*tail):
    return pl.BlockSpec((None, geo.Bq, None, *tail),
                        lambda i, h, b: (b, i, h) + (0,) * len(tail))

  def per_head(D):
    return pl.BlockSpec((None, geo.Tk, None, D), lambda i, h, b: (b, 0, h, 0))

  union = pl.BlockSpec((None, None, None, geo.U), lambda i, h, b: (b, h, i, 0))
  count = pl.BlockSpec((None, None, None, 1), lambda i, h, b: (b, h, i, 0))
  offset = pl.BlockSpec((1,), lambda i, h, b: (0,))
  return per_tile, [per_tile(geo.Gp, geo.Dkp), per_head(geo.Dkp),
                    per_head(geo.Dvp), per_tile(geo.n_pad), offset, union, count]


def forward(q5, k, v, blk, q_offset, union, count, geo: Geometry):
  per_tile, in_specs = _tile_specs(geo)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, geo=geo),
      grid=(geo.nT, geo.HKV, geo.B),
      in_specs=in_specs,
      out_specs=[per_tile(geo.Gp, geo.Dvp), per_tile(geo.Gp)],
      out_shape=[
          jax.ShapeDtypeStruct((geo.B, geo.Tq, geo.HKV, geo.Gp, geo.Dvp), q5.dtype),
          jax.ShapeDtypeStruct((geo.B, geo.Tq, geo.HKV, geo.Gp), jnp.float32)],
      compiler_params=geo.params(), interpret=geo.interpret,
      name="nsa_selected_fwd",
  )(q5, k, v, blk, q_offset, union, count)


def block_forward(q5, k, v, blk, q_offset, entries, items, geo: Geometry, bias=None):
  """The block-major forward: per-entry outputs and lse (`_block_fwd_kernel`), to merge;
  bias: None or [B, E, HKV, Gp] float32, each entry's score bias."""
  HKV, E, whole = geo.HKV, geo.Tq * geo.n_pad, _whole_spec(geo)
  biased = bias is not None
  o_part, lse_part = pl.pallas_call(
      functools.partial(_block_fwd_kernel, geo=geo, biased=biased),
      grid=(items.shape[2], geo.B * HKV),
      in_specs=[
          whole(geo.Tq, geo.Gp, geo.Dkp), whole(geo.Tk, geo.Dkp), whole(geo.Tk, geo.Dvp),
          _OFFSET_BLOCK,
          pl.BlockSpec((None, None, E), lambda w, z: (z // HKV, z % HKV, 0)),
          pl.BlockSpec((None, None, None, 4), lambda w, z: (z // HKV, z % HKV, w, 0)),
      ] + [whole(E, geo.Gp)] * biased,
      out_specs=[whole(E, geo.Gp, geo.Dvp), whole(E, geo.Gp)],
      out_shape=[jax.ShapeDtypeStruct((geo.B, E, HKV, geo.Gp, geo.Dvp), q5.dtype),
                 jax.ShapeDtypeStruct((geo.B, E, HKV, geo.Gp), jnp.float32)],
      compiler_params=geo.params(geo.tiles.block_fwd_num_warps),
      interpret=geo.interpret, name="nsa_selected_block_fwd",
  )(q5, k, v, q_offset, entries, items, *[bias] * biased)
  return o_part, lse_part


def backward_dq(q5, k, v, blk, q_offset, union, count, do5, lse, delta, geo: Geometry):
  per_tile, in_specs = _tile_specs(geo)
  return pl.pallas_call(
      functools.partial(_dq_kernel, geo=geo),
      grid=(geo.nT, geo.HKV, geo.B),
      in_specs=in_specs + [per_tile(geo.Gp, geo.Dvp), per_tile(geo.Gp),
                           per_tile(geo.Gp)],
      out_specs=per_tile(geo.Gp, geo.Dkp),
      out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
      compiler_params=geo.params(), interpret=geo.interpret,
      name="nsa_selected_dq",
  )(q5, k, v, blk, q_offset, union, count, do5, lse, delta)


# The query offset [1] of the kernels on grid (W, B*HKV).
_OFFSET_BLOCK = pl.BlockSpec((1,), lambda w, z: (0,))


def _whole_spec(geo: Geometry):
  """BlockSpec maker of the block-major kernels, grid (W, B*HKV): the whole
  sequence axis of head (b, h) of a [B, L, HKV, *tail] array."""
  HKV = geo.HKV

  def whole(*shape):
    return pl.BlockSpec((None, shape[0], None, *shape[1:]),
                        lambda w, z: (z // HKV, 0, z % HKV) + (0,) * (len(shape) - 1))
  return whole


def backward_dkv(q5, k, v, blk, q_offset, do5, lse, delta, ids, items, geo: Geometry,
                 block_major: bool, bias=None):
  """dK, dV (float32, [B, Tk, HKV, D]) over work items of query tiles, or,
  block-major, of (token, block) entries, and then also the entries' dQ terms
  [B, Tq*n_pad, HKV, Gp, Dkp] (`dq_dtype`) and, with a bias (block-major only, as in
  `block_forward`), its gradient [B, Tq*n_pad, HKV, Gp] float32."""
  HKV, whole = geo.HKV, _whole_spec(geo)
  biased = bias is not None
  assert block_major or not biased, "a score bias runs block-major only"
  E = geo.Tq * geo.n_pad
  dk0 = jnp.zeros((geo.B, geo.Tk, HKV, geo.Dkp), jnp.float32)
  dv0 = jnp.zeros((geo.B, geo.Tk, HKV, geo.Dvp), jnp.float32)
  out_specs = [whole(geo.Tk, geo.Dkp), whole(geo.Tk, geo.Dvp)]
  out_shape = [jax.ShapeDtypeStruct(dk0.shape, dk0.dtype),
               jax.ShapeDtypeStruct(dv0.shape, dv0.dtype)]
  if block_major:
    out_specs.append(whole(E, geo.Gp, geo.Dkp))
    out_shape.append(jax.ShapeDtypeStruct((geo.B, E, HKV, geo.Gp, geo.Dkp),
                                          dq_dtype(geo.tiles, q5.dtype)))
  if biased:
    out_specs.append(whole(E, geo.Gp))
    out_shape.append(jax.ShapeDtypeStruct((geo.B, E, HKV, geo.Gp), jnp.float32))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, geo=geo, block_major=block_major, biased=biased),
      grid=(items.shape[2], geo.B * HKV),
      in_specs=[
          whole(geo.Tq, geo.Gp, geo.Dkp), whole(geo.Tk, geo.Dkp),
          whole(geo.Tk, geo.Dvp), whole(geo.Tq, geo.n_pad), _OFFSET_BLOCK,
          whole(geo.Tq, geo.Gp, geo.Dvp), whole(geo.Tq, geo.Gp),
          whole(geo.Tq, geo.Gp),
          pl.BlockSpec((None, None, ids.shape[2]),
                       lambda w, z: (z // HKV, z % HKV, 0)),
          pl.BlockSpec((None, None, None, 4),
                       lambda w, z: (z // HKV, z % HKV, w, 0)),
      ] + out_specs[:2] + [whole(E, geo.Gp)] * biased,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases={10: 0, 11: 1},
      # Block-major float32 steps hold one more [l', D] operand (K, for dQ):
      # two stages ask for more shared memory than an H200 has.
      compiler_params=geo.params(geo.tiles.dkv_num_warps,
                                 1 if block_major and q5.dtype.itemsize == 4 else None),
      interpret=geo.interpret, name="nsa_selected_dkv",
  )(q5, k, v, blk, q_offset, do5, lse, delta, ids, items, dk0, dv0, *[bias] * biased)
