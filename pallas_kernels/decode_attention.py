"""Split-K decode attention for NSA: one query token per sequence (paper §5.2, Table 4).

Each branch's cache is cut into BLOCK_K-row tiles spread over a (batch, KV head, split)
grid; each program takes its group's G heads, walks its tiles with an online softmax and
writes a partial result, as in flash-decoding. A step is five launches: `_compressed_kernel`
(compressed keys, and the selection's block scores started on the way), `_scores_kernel`
(each head's lse, the block scores: the heads summed or their max, `sizes.group_score`),
`_top_n_kernel` (Eq. 11), `_local_kernel` (selected blocks and window) and `_combine_kernel`
(merges partials, applies the gates). Design: docs/kernels.md#decode-kernel. Reference:
`nsa_jax.ops.decode.nsa_decode_xla`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _util
from pallas_kernels.scoring import Selection, exact_dot, overlap_matrix

BLOCK_K = 64            # cache rows per tile
TARGET_PROGRAMS = 1024  # programs per branch: ~8 per SM of an H100/H200 ...
MAX_SPLITS = 64         # ... and at most this many per (sequence, group)
COMPRESSED = dict(num_warps=2, num_stages=2)   # launch parameters of each kernel
LOCAL = dict(num_warps=4, num_stages=2)
SCORES = dict(num_warps=4, num_stages=1)
TOP_N = dict(num_warps=1, num_stages=1)
COMBINE = dict(num_warps=8, num_stages=1)
SCORES_ELEMENTS = 4096  # float32 values per tensor of the 4-warp scores kernel ...
COMBINE_ELEMENTS = 8192 # ... and the 8-warp combine kernel
DV_CHUNK = 32           # output columns per combine program
NEG = float(jnp.finfo(jnp.float32).min)


def _block_k(sizes: Selection) -> int:
  """Cache rows per tile: BLOCK_K, or l' when smaller (a tile stays in one block)."""
  return min(BLOCK_K, sizes.select_block)


def unsupported(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *,
                sizes: Selection) -> str | None:
  """Why the kernel cannot take these (already validated) inputs, or None."""
  Dk, Dv, lp = q.shape[-1], v_slc.shape[-1], sizes.select_block
  bk = _block_k(sizes)
  if why := _util.dtype_unsupported(q.dtype):
    return why
  if not (_util.is_pow2(Dk) and _util.is_pow2(Dv) and Dk >= 16 and Dv >= 16):
    return f"head dims Dk={Dk}, Dv={Dv} must be powers of 2 >= 16"
  if not (_util.is_pow2(lp) and lp >= 16):
    return f"select_block={lp} must be a power of 2 >= 16"
  if k_slc.shape[1] % bk or k_cmp.shape[1] % bk:
    return (f"cache rows S={k_slc.shape[1]}, Sc={k_cmp.shape[1]} must be multiples of "
            f"{bk} (caches from nsa_jax.decoding.init_cache are)")
  if (bk * sizes.compress_stride) % lp:
    return (f"select_block={lp} must divide {bk} compressed blocks x stride "
            f"{sizes.compress_stride} (a tile's first selection block)")
  need = shared_memory(q.shape[1] // k_slc.shape[2], Dk, Dv, bk, jnp.dtype(q.dtype).itemsize)
  if need > _util.shared_memory_budget():
    return (f"its tiles need {need} bytes of shared memory per program for Dk={Dk}, Dv={Dv}, "
            f"{q.dtype}; the device has {_util.shared_memory_budget()}")
  return None


def shared_memory(G: int, Dk: int, Dv: int, bk: int, itemsize: int) -> int:
  """Estimated shared memory (bytes) of the compressed and local kernels' programs
  (the others hold less), counted from `_attend` as Triton allocates it: the query
  heads' tile, one copy of a step's K and V tiles (16-row dots: not multi-buffered),
  the probabilities from registers, and the compressed kernel's `exact_dot` pieces."""
  Gp = max(16, _util.next_pow2(G))
  return (itemsize * (Gp * Dk + bk * (Dk + Dv) + Gp * bk)
          + 2 * (Gp * bk + bk * 16) + _util.SCRATCH_BYTES)


def _split(tiles: int, programs_per_group: int) -> tuple[int, int]:
  """(tiles per program, programs), both powers of 2, for `tiles` tiles."""
  per = _util.next_pow2(_util.cdiv(tiles, programs_per_group))
  return per, _util.next_pow2(_util.cdiv(tiles, per))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static geometry of one decode call (docs/kernels.md#decode-kernel)."""
  G: int            # query heads per group
  Gp: int           # ... padded to a dot's 16 rows
  HQ: int
  S: int            # cache rows
  bk: int           # rows per tile
  per_tile: int     # selection blocks starting in a tile of compressed keys
  cols: int         # block sums stored per tile: per_tile padded to a dot's 16
  score_rows: int   # block scores are [score_rows, per_tile], block r*per_tile + u ...
  rows_per_program: int   # ... scored rows_per_program rows per program
  n_pad: int        # selected-block slots, n padded to a power of 2
  cmp: tuple[int, int]   # (tiles per program, programs) of each branch
  slc: tuple[int, int]
  win: tuple[int, int]
  window: int       # w, the window's keys

  @classmethod
  def make(cls, B, HQ, HKV, S, Sc, sizes: Selection, window: int):
    lp, d = sizes.select_block, sizes.compress_stride
    bk = _block_k(sizes)
    per_tile = bk * d // lp
    splits = max(1, min(MAX_SPLITS, TARGET_PROGRAMS // (B * HKV)))
    blocks = max(sizes.num_select_blocks(S), sizes.num_selected)
    win_tiles = min(_util.cdiv(window, bk) + 1, S // bk)   # w rows from an aligned start
    G = HQ // HKV
    Gp = max(16, _util.next_pow2(G))
    score_rows = _util.next_pow2(_util.cdiv(blocks, per_tile))
    return cls(G=G, Gp=Gp, HQ=HQ, S=S, bk=bk, per_tile=per_tile,
               cols=max(16, per_tile),
               score_rows=score_rows,
               rows_per_program=min(score_rows, max(1, SCORES_ELEMENTS // (Gp * per_tile))),
               n_pad=_util.next_pow2(sizes.num_selected),
               cmp=_split(Sc // bk, splits),
               slc=_split(sizes.num_selected * (lp // bk), splits),
               win=_split(win_tiles, splits), window=window)


# ------------------------------------------------------------------ kernels


def _attend(q, k_ref, v_ref, count, tile_rows, *, bk: int, scale: float, probs=None):
  """Online softmax of q [Gp, Dk] over `count` tiles of bk rows.

  tile_rows(i) -> (row0, lo, hi): tile i holds rows row0 .. row0 + bk - 1, of
  which those in [lo, hi) are visible. probs(i, row0, s, visible, tile_max,
  m_new), if given, returns the tile's exp(s - m_new) (default: computed here).
  Returns the partial (acc [Gp, Dv], m [Gp], l [Gp]) in float32.
  """
  def body(i, carry):
    acc, m, l = carry
    row0, lo, hi = tile_rows(i)
    rows = row0 + jnp.arange(bk, dtype=jnp.int32)
    visible = ((rows >= lo) & (rows < hi))[None, :]
    k = k_ref[pl.ds(row0, bk), :]
    s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale   # [Gp, bk]
    s = jnp.where(visible, s, NEG)
    tile_max = s.max(axis=1)
    m_new = jnp.maximum(m, tile_max)
    if probs is None:
      p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
    else:
      p = probs(i, row0, s, visible, tile_max, m_new)
    corr = jnp.exp(m - m_new)
    v = v_ref[pl.ds(row0, bk), :]
    acc = acc * corr[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
    return acc, m_new, l * corr + p.sum(axis=1)

  Gp, Dv = q.shape[0], v_ref.shape[-1]
  init = (jnp.zeros((Gp, Dv), jnp.float32), jnp.full((Gp,), NEG, jnp.float32),
          jnp.zeros((Gp,), jnp.float32))
  return lax.fori_loop(0, count, body, init)


def _position(len_ref, plan: _Plan):
  """The query's position t: its sequence's length - 1, clamped to the cache
  (`nsa_jax.ops.decode.nsa_decode` clamps lengths to 1 .. S alike)."""
  return jnp.clip(len_ref[0], 1, plan.S) - 1


def _store(o_ref, m_ref, l_ref, partial):
  o_ref[...], m_ref[...], l_ref[...] = partial


def _compressed_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, blk_ref,
                       spill_ref, tile_max_ref, *, plan: _Plan, scale: float,
                       sizes: Selection):
  """Program (b, h, p): tiles p*per .. of the visible compressed keys, and
  their selection-block sums relative to the tile max: blk_ref [per, Gp, cols]
  (local tile i, column u: block (tile)*per_tile + u), spill_ref [per, Gp]
  (block (tile + 1)*per_tile) and the max, tile_max_ref [per, Gp]."""
  per, bk = plan.cmp[0], plan.bk
  first = pl.program_id(2) * per
  visible = sizes.num_visible(_position(len_ref, plan))
  count = jnp.clip(_util.cdiv(visible, bk) - first, 0, per)
  # Tile c covers tokens [c*bk*d, (c+1)*bk*d + l - d): its own per_tile blocks
  # and, as l - d < l', at most the next one. The overlaps are the same for
  # every tile (tile c starts at stride c*bk, its blocks at c*bk + u*l'/d).
  weights = overlap_matrix(0, bk, 0, plan.cols, plan.per_tile, sizes, jnp.float32)
  spill_weights = overlap_matrix(0, bk, plan.per_tile, 16, 1, sizes, jnp.float32).sum(axis=1)

  def probs(i, row0, s, seen, tile_max, m_new):
    p_tile = jnp.where(seen, jnp.exp(s - tile_max[:, None]), 0.0)
    blk_ref[i] = exact_dot(p_tile, weights)
    spill_ref[i] = (p_tile * spill_weights[None, :]).sum(axis=1)
    tile_max_ref[i] = tile_max
    return p_tile * jnp.exp(tile_max - m_new)[:, None]   # exp(s - m_new), one exp per key

  _store(o_ref, m_ref, l_ref, _attend(
      q_ref[...], k_ref, v_ref, count, lambda i: ((first + i) * bk, 0, visible),
      bk=bk, scale=scale, probs=probs))


def _scores_kernel(len_ref, m_ref, l_ref, blk_ref, spill_ref, tile_max_ref, scores_ref, *,
                   plan: _Plan, sizes: Selection):
  """Program (b, h, r): block scores (Eq. 9-10) of score rows r*rows .., all
  heads at once: each head's lse from the compressed partials, the tile sums
  (row c: tile c) and spills (row c: tile c - 1) rescaled by exp(tile max -
  lse), summed over heads (Eq. 10) or, sizes.group_score "max", their max (a padded
  head's scores are 0, below or at every head's)."""
  m, l = m_ref[...], l_ref[...]                    # [P, Gp] compressed partials
  top = m.max(axis=0)
  total = (l * jnp.exp(m - top[None, :])).sum(axis=0)
  lse = top + jnp.log(jnp.maximum(total, 1e-30))
  head_ok = (total > 0) & (jnp.arange(plan.Gp, dtype=jnp.int32) < plan.G)
  tiles = _util.cdiv(sizes.num_visible(_position(len_ref, plan)), plan.bk)   # written
  nt = tile_max_ref.shape[0]
  rows = plan.rows_per_program

  def tile_rows(shift):
    """Tiles r - shift of this program's rows r: (clipped index, [rows, Gp]
    mask, exp(tile max - lse) where the mask holds)."""
    c = pl.program_id(2) * rows + jnp.arange(rows, dtype=jnp.int32) - shift
    ok = ((c >= 0) & (c < tiles))[:, None] & head_ok[None, :]
    c = jnp.clip(c, 0, nt - 1)
    return c, ok, jnp.where(ok, jnp.exp(tile_max_ref[c] - lse[None, :]), 0.0)

  c, ok, rescale = tile_rows(0)
  sums = jnp.where(ok[:, :, None], blk_ref[c, :, pl.ds(0, plan.per_tile)], 0.0)
  heads = rescale[:, :, None] * sums                              # [rows, Gp, per_tile]
  c, ok, rescale = tile_rows(1)
  spill = rescale * jnp.where(ok, spill_ref[c], 0.0)              # [rows, Gp]
  first_col = jnp.arange(plan.per_tile, dtype=jnp.int32)[None, :] == 0
  if sizes.group_score == "sum":
    scores_ref[...] = heads.sum(axis=1) + jnp.where(first_col, spill.sum(axis=1)[:, None], 0.0)
  else:
    scores_ref[...] = (heads + jnp.where(first_col[None], spill[:, :, None], 0.0)).max(axis=1)


def _top_n(live, index, n: int, n_pad: int):
  """Indices [n_pad] of the n largest entries of live (any shape; index holds
  each entry's index, distinct), in descending order, ties to the lower index
  (`lax.top_k`); -1 in slots whose value is -inf and past n.

  n passes of "max, lowest index holding it, knock it out": 2n reductions, no
  sort (Triton has none in Pallas).
  """
  slot = jnp.arange(n_pad, dtype=jnp.int32)
  big = jnp.iinfo(jnp.int32).max

  def pick(i, carry):
    live, out = carry
    best = live.max()
    at = jnp.where(live == best, index, big).min()
    out = jnp.where(slot == i, jnp.where(best == -jnp.inf, -1, at), out)
    return jnp.where(index == at, -jnp.inf, live), out

  return lax.fori_loop(0, n, pick, (live, jnp.full((n_pad,), -1, jnp.int32)))[1]


def _top_n_kernel(len_ref, scores_ref, idx_ref, *, plan: _Plan, sizes: Selection):
  """Program (b, h): the top n blocks (Eq. 11), forced initial and local
  blocks first, of scores_ref [score_rows * per_tile] into idx_ref [n_pad]
  (a flat row: one warp reduces it with shuffles alone)."""
  j = jnp.arange(plan.score_rows * plan.per_tile, dtype=jnp.int32)
  cur = _position(len_ref, plan) // sizes.select_block
  candidate = j <= cur
  forced = candidate & ((j < sizes.num_initial) | (j > cur - sizes.num_local))
  live = jnp.where(forced, jnp.inf, jnp.where(candidate, scores_ref[...], -jnp.inf))
  idx_ref[...] = _top_n(live, j, sizes.num_selected, plan.n_pad)


def _local_kernel(len_ref, idx_ref, q_ref, k_slc_ref, v_slc_ref, k_win_ref, v_win_ref,
                  o_ref, m_ref, l_ref, *, plan: _Plan, scale: float, sizes: Selection):
  """Programs p < P_slc: selected tiles p*per ..; the rest: window tiles."""
  t = _position(len_ref, plan)
  p = pl.program_id(2)
  q = q_ref[...]
  bk, lp = plan.bk, sizes.select_block
  attend = functools.partial(_attend, q, bk=bk, scale=scale)
  (per_s, P_s), (per_w, _) = plan.slc, plan.win

  @pl.when(p < P_s)
  def _():
    first = p * per_s
    tiles_per_block = lp // bk

    def tile_rows(i):   # slot (first + i) // tiles_per_block, cut at the query
      u = first + i
      blk = idx_ref[u // tiles_per_block]
      start = jnp.maximum(blk, 0) * lp
      hi = jnp.where(blk >= 0, jnp.minimum(start + lp, t + 1), 0)
      return start + u % tiles_per_block * bk, start, hi

    count = jnp.clip(sizes.num_selected * tiles_per_block - first, 0, per_s)
    _store(o_ref, m_ref, l_ref, attend(k_slc_ref, v_slc_ref, count, tile_rows))

  @pl.when(p >= P_s)
  def _():
    first = (p - P_s) * per_w
    lo = jnp.maximum(t - plan.window + 1, 0)
    base = lo // bk * bk
    count = jnp.clip(_util.cdiv(t + 1 - base, bk) - first, 0, per_w)
    _store(o_ref, m_ref, l_ref, attend(
        k_win_ref, v_win_ref, count, lambda i: (base + (first + i) * bk, lo, t + 1)))


def _merged(o_ref, m_ref, l_ref, start: int, parts: int):
  """Normalised output [Gp, DV_CHUNK] of partials start .. start + parts - 1,
  as many at a time as fit a COMBINE_ELEMENTS tensor."""
  Gp, Dv = o_ref.shape[-2:]
  chunk = min(parts, max(1, COMBINE_ELEMENTS // (Gp * Dv)))

  def body(c, carry):
    acc, M, L = carry
    at = pl.ds(start + c * chunk, chunk)
    m, l, o = m_ref[at], l_ref[at], o_ref[at]     # [chunk, Gp], [chunk, Gp, Dv]
    M_new = jnp.maximum(M, m.max(axis=0))
    w = jnp.exp(m - M_new[None, :])
    corr = jnp.exp(M - M_new)
    acc = acc * corr[:, None] + (w[:, :, None] * o).sum(axis=0)
    return acc, M_new, L * corr + (w * l).sum(axis=0)

  acc, _, L = lax.fori_loop(0, parts // chunk, body,
                            (jnp.zeros((Gp, Dv), jnp.float32),
                             jnp.full((Gp,), NEG, jnp.float32), jnp.zeros((Gp,), jnp.float32)))
  return acc / jnp.where(L > 0, L, 1.0)[:, None]


def _combine_kernel(gates_ref, o_cmp_ref, m_cmp_ref, l_cmp_ref, o_loc_ref, m_loc_ref,
                    l_loc_ref, out_ref, *, plan: _Plan):
  """Program (b, h, c): g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (Eq. 5),
  output columns c*DV_CHUNK .."""
  b, h = pl.program_id(0), pl.program_id(1)
  heads = h * plan.G + jnp.minimum(jnp.arange(plan.Gp, dtype=jnp.int32), plan.G - 1)
  gate = lambda c: gates_ref[(b * plan.HQ + heads) * 3 + c].astype(jnp.float32)[:, None]
  P_s, P_w = plan.slc[1], plan.win[1]
  out = (gate(0) * _merged(o_cmp_ref, m_cmp_ref, l_cmp_ref, 0, plan.cmp[1])
         + gate(1) * _merged(o_loc_ref, m_loc_ref, l_loc_ref, 0, P_s)
         + gate(2) * _merged(o_loc_ref, m_loc_ref, l_loc_ref, P_s, P_w))
  out_ref[...] = out.astype(out_ref.dtype)


# ------------------------------------------------------------- pallas calls


def _partials_shapes(B, HKV, P, Gp, Dv):
  return [jax.ShapeDtypeStruct((B, HKV, P, Gp, Dv), jnp.float32),
          jax.ShapeDtypeStruct((B, HKV, P, Gp), jnp.float32),
          jax.ShapeDtypeStruct((B, HKV, P, Gp), jnp.float32)]


def _group_block(shape):
  """BlockSpec of group (b, h)'s whole slice [b, h, ...] of an array, any grid."""
  return pl.BlockSpec((None, None, *shape), lambda b, h, *_: (b, h) + (0,) * len(shape))


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *,
               sizes: Selection, window: int, scale: float, interpret: bool):
  """Kernel path of `nsa_jax.ops.decode.nsa_decode`: (o [B, HQ, Dv], block_idx [B, HKV, n])."""
  B, HQ, Dk = q.shape
  Sc, HKV = k_cmp.shape[1], k_cmp.shape[2]
  S, Dv = k_slc.shape[1], v_slc.shape[-1]
  plan = _Plan.make(B, HQ, HKV, S, Sc, sizes, window)
  G, Gp = plan.G, plan.Gp
  qg = jnp.pad(q.reshape(B, HKV, G, Dk), [(0, 0), (0, 0), (0, Gp - G), (0, 0)])
  lens = lengths.reshape(B, 1)
  call = lambda kernel, params, name, **kw: pl.pallas_call(
      kernel, compiler_params=plgpu.CompilerParams(**params), interpret=interpret,
      name=name, **kw)
  len_spec = pl.BlockSpec((None, 1), lambda b, *_: (b, 0))
  kv_spec = lambda rows, D: pl.BlockSpec((None, rows, None, D), lambda b, h, p: (b, 0, h, 0))
  partial_specs = [pl.BlockSpec((None, None, None, Gp, Dv), lambda b, h, p: (b, h, p, 0, 0))] + [
      pl.BlockSpec((None, None, None, Gp), lambda b, h, p: (b, h, p, 0))] * 2
  common = dict(plan=plan, sizes=sizes)

  per_c, P_c = plan.cmp
  nt, cols = per_c * P_c, plan.cols
  per_tile_spec = pl.BlockSpec((None, None, per_c, Gp), lambda b, h, p: (b, h, p, 0))
  o_c, m_c, l_c, blk, spill, tile_max = call(
      functools.partial(_compressed_kernel, scale=scale, **common), COMPRESSED,
      "nsa_decode_compressed", grid=(B, HKV, P_c),
      in_specs=[len_spec, _group_block((Gp, Dk)), kv_spec(Sc, Dk), kv_spec(Sc, Dv)],
      out_specs=partial_specs + [
          pl.BlockSpec((None, None, per_c, Gp, cols), lambda b, h, p: (b, h, p, 0, 0)),
          per_tile_spec, per_tile_spec],
      out_shape=_partials_shapes(B, HKV, P_c, Gp, Dv) + [
          jax.ShapeDtypeStruct((B, HKV, nt, Gp, cols), jnp.float32)]
      + [jax.ShapeDtypeStruct((B, HKV, nt, Gp), jnp.float32)] * 2,
  )(lens, qg, k_cmp, v_cmp)

  R, rows = plan.score_rows, plan.rows_per_program
  scores = call(
      functools.partial(_scores_kernel, **common), SCORES, "nsa_decode_scores",
      grid=(B, HKV, R // rows),
      in_specs=[len_spec, _group_block((P_c, Gp)), _group_block((P_c, Gp)),
                _group_block((nt, Gp, cols)), _group_block((nt, Gp)), _group_block((nt, Gp))],
      out_specs=pl.BlockSpec((None, None, rows, plan.per_tile), lambda b, h, r: (b, h, r, 0)),
      out_shape=jax.ShapeDtypeStruct((B, HKV, R, plan.per_tile), jnp.float32),
  )(lens, m_c, l_c, blk, spill, tile_max)

  block_idx = call(
      functools.partial(_top_n_kernel, **common), TOP_N, "nsa_decode_top_n", grid=(B, HKV),
      in_specs=[len_spec, _group_block((R * plan.per_tile,))],
      out_specs=_group_block((plan.n_pad,)),
      out_shape=jax.ShapeDtypeStruct((B, HKV, plan.n_pad), jnp.int32),
  )(lens, scores.reshape(B, HKV, R * plan.per_tile))

  P_l = plan.slc[1] + plan.win[1]
  o_l, m_l, l_l = call(
      functools.partial(_local_kernel, scale=scale, **common), LOCAL, "nsa_decode_local",
      grid=(B, HKV, P_l),
      in_specs=[len_spec, _group_block((plan.n_pad,)), _group_block((Gp, Dk)),
                kv_spec(S, Dk), kv_spec(S, Dv), kv_spec(S, Dk), kv_spec(S, Dv)],
      out_specs=partial_specs, out_shape=_partials_shapes(B, HKV, P_l, Gp, Dv),
  )(lens, block_idx, qg, k_slc, v_slc, k_win, v_win)

  dv = min(DV_CHUNK, Dv)
  columns = lambda P: [
      pl.BlockSpec((None, None, P, Gp, dv), lambda b, h, c: (b, h, 0, 0, c)),
      _group_block((P, Gp)), _group_block((P, Gp))]
  o = call(
      functools.partial(_combine_kernel, plan=plan), COMBINE, "nsa_decode_combine",
      grid=(B, HKV, Dv // dv),
      in_specs=[pl.BlockSpec((B * HQ * 3,), lambda *_: (0,))] + columns(P_c) + columns(P_l),
      out_specs=pl.BlockSpec((None, None, Gp, dv), lambda b, h, c: (b, h, 0, c)),
      out_shape=jax.ShapeDtypeStruct((B, HKV, Gp, Dv), q.dtype),
  )(gates.reshape(-1), o_c, m_c, l_c, o_l, m_l, l_l)
  return o[:, :, :G].reshape(B, HQ, Dv), block_idx[..., :sizes.num_selected]
