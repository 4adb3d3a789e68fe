"""The banded flash-attention Pallas kernels (Triton lowering): forward, dq and dk/dv.

Which keys a query sees (`Band`), packed rows as positions (`Documents`), the static
shapes of a call (`Shapes`) and the three kernels: `fwd_kernel` (online softmax, o and
lse, one program per query tile), `dq_kernel` (per query tile) and `dkv_kernel` (per key
tile), each looping only over the tiles its band reaches. Their pallas_calls and the custom
VJP: `_flash.py`. Design: docs/kernels.md#banded-flash-attention.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _util

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Band:
  """Which keys a query sees: key j at position j*stride + offset, query t sees
  positions in (t - window, t]; `window=None` means no lower edge."""

  stride: int = 1
  offset: int = 0
  window: int | None = None

  def __post_init__(self):
    if self.stride < 1 or self.offset < 0:
      raise ValueError(f"Band needs stride >= 1 and offset >= 0, got "
                       f"stride={self.stride}, offset={self.offset}")
    if self.window is not None and self.window < 1:
      raise ValueError(f"Band.window={self.window} must be >= 1 or None")

  def visible(self, t, j, num_keys: int, doc_start=None):
    """Mask of query positions t against key indices j (broadcasting); with
    doc_start (s(t), broadcast like t) only keys whose first token j*stride is in
    t's document."""
    pos = j * self.stride + self.offset
    mask = (pos <= t) & (j < num_keys)
    if self.window is not None:
      mask &= pos > t - self.window
    if doc_start is not None:
      mask &= doc_start <= j * self.stride
    return mask

  def key_range(self, t_first, t_last, num_keys: int, doc_start=None):
    """[lo, hi): the keys that some query in t_first..t_last sees; doc_start: no
    key before that position's (the queries' documents start there or later)."""
    hi = jnp.minimum(
        _util.div(jnp.maximum(t_last - self.offset + self.stride, 0), self.stride),
        num_keys)
    lo = 0
    if self.window is not None:
      lo = _util.div_up(jnp.maximum(t_first - self.window + 1 - self.offset, 0), self.stride)
    if doc_start is not None:
      lo = jnp.maximum(lo, _util.div_up(doc_start, self.stride))
    return lo, hi

  def query_range(self, j_first, j_last, end: int, doc_end=None):
    """[lo, hi): the query positions (below `end`) that see some key in
    j_first..j_last; doc_end: none from that position on (the keys' documents end
    there or earlier)."""
    lo = j_first * self.stride + self.offset
    hi = end if doc_end is None else jnp.minimum(doc_end, end)
    if self.window is None:
      return lo, hi
    return lo, jnp.minimum(j_last * self.stride + self.offset + self.window, hi)

  def key_blocks(self, t_first, t_last, num_keys: int, size: int, doc_starts=None):
    """Key blocks of `size` for the queries t_first..t_last, see `_block_ranges`.

    doc_starts: (least, greatest) document start s(t) of those queries, or None."""
    least, greatest = (None, None) if doc_starts is None else doc_starts
    return _block_ranges(self.key_range(t_first, t_last, num_keys, least),
                         self.key_range(t_last, t_first, num_keys, greatest), size)

  def query_tiles(self, j_first, j_last, num_queries: int, num_keys: int,
                  size: int, q_offset=0, doc_ends=None):
    """Query tiles of `size` (of the num_queries rows at positions q_offset ..) for
    the keys j_first..j_last, see `_block_ranges`.

    doc_ends: (least, greatest) end of the documents of those keys, or None."""
    least, greatest = (None, None) if doc_ends is None else doc_ends
    end = q_offset + num_queries
    all_lo, all_hi = self.query_range(j_last, j_first, end, least)
    # Keys past the end are masked out, so no tile sees the block whole.
    all_hi = jnp.where(j_last < num_keys, all_hi, all_lo)
    rows = lambda r: tuple(jnp.clip(x - q_offset, 0, num_queries) for x in r)
    return _block_ranges(rows(self.query_range(j_first, j_last, end, greatest)),
                         rows((all_lo, all_hi)), size)


class Documents(NamedTuple):
  """Packed rows (docs/semantics.md#packed-rows) as the kernels take them: positions, never
  segment ids.

  query_start: [B, T] int32, the first position of the document of each query row.
  key_end: [B, S] int32, one past the last position of the document that holds key
    j's first token j*stride (`Band`).
  """

  query_start: jax.Array
  key_end: jax.Array


def _block_ranges(some, every, size: int):
  """(lo, full_lo, full_hi, hi): blocks of `size` in [lo, hi) overlap the index
  range `some` (seen by some query/key of the other side), those in
  [full_lo, full_hi) lie inside `every` (seen by all: no mask needed)."""
  lo = _util.div(some[0], size)
  hi = jnp.maximum(_util.div_up(some[1], size), lo)
  full_lo = jnp.clip(_util.div_up(every[0], size), lo, hi)
  full_hi = jnp.clip(_util.div(jnp.maximum(every[1], 0), size), full_lo, hi)
  return lo, full_lo, full_hi, hi


def _banded_loop(blocks, body, carry):
  """Runs body(i, carry, masked) over blocks (lo, full_lo, full_hi, hi): with
  the mask on the edge blocks, without it on the inner ones."""
  lo, full_lo, full_hi, hi = blocks
  carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False),
                        carry)
  return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Static facts of one call: sizes before and after padding, interpret mode."""

  B: int
  T: int         # queries
  S: int         # keys
  HKV: int
  G: int
  Dk: int
  Dv: int
  block_m: int
  block_k: int
  interpret: bool

  @property
  def Gp(self):
    return pl.next_power_of_2(self.G)

  @property
  def Dkp(self):
    return max(16, pl.next_power_of_2(self.Dk))

  @property
  def Dvp(self):
    return max(16, pl.next_power_of_2(self.Dv))

  @property
  def Bq(self):
    """Tokens per query tile."""
    return max(1, self.block_m // self.Gp)

  @property
  def M(self):
    return self.Bq * self.Gp

  @property
  def num_q_tiles(self):
    return pl.cdiv(self.T, self.Bq)

  @property
  def num_k_tiles(self):
    return max(1, pl.cdiv(self.S, self.block_k))

  @property
  def Tp(self):
    return self.num_q_tiles * self.Bq

  @property
  def Sp(self):
    return self.num_k_tiles * self.block_k


def _row_positions(t_first, sh: Shapes):
  """Query position of each of the M packed rows (token-major, heads minor)."""
  return t_first + _util.div(lax.broadcasted_iota(jnp.int32, (sh.M,), 0), sh.Gp)


def _token_rows(x, sh: Shapes):
  """[N] per-token values -> [N * Gp], one per packed row (token-major, heads minor)."""
  return jnp.broadcast_to(x[:, None], (x.shape[0], sh.Gp)).reshape(-1)


def query_tile(i, sh: Shapes, reverse: bool):
  """Query tile of program i; reverse=True runs the longest tiles (the last
  ones under a causal band without lower edge) first, for tail balance."""
  return sh.num_q_tiles - 1 - i if reverse else i


@dataclasses.dataclass(frozen=True)
class Inputs:
  """Which optional inputs a call has (static): `Documents`, a query offset."""

  docs: bool
  offset: bool

  def split(self, refs, *, ends: bool = False):
    """(start_ref, end_ref, offset_ref, rest) of a kernel's refs after its fixed
    inputs, None where absent; end_ref only where `ends` (the dk/dv kernel)."""
    flags = (self.docs, self.docs and ends, self.offset)
    out, i = [], 0
    for flag in flags:
      out.append(refs[i] if flag else None)
      i += flag
    return (*out, refs[i:])


def _first_position(offset_ref):
  """Position of query row 0: 0, or the query offset."""
  return 0 if offset_ref is None else offset_ref[0]


def _tile_documents(start_ref, sh: Shapes):
  """(s(t) of the tile's packed rows [M, 1], (least, greatest) s(t) of the tile),
  or (None, None) without documents."""
  if start_ref is None:
    return None, None
  start = start_ref[...]
  return _token_rows(start, sh)[:, None], (jnp.min(start), jnp.max(start))


# ----------------------------------------------------------------- kernels


def fwd_kernel(q_ref, k_ref, v_ref, *refs, band: Band, sh: Shapes, scale: float,
               reverse: bool, inputs: Inputs):
  start_ref, _, offset_ref, (o_ref, lse_ref) = inputs.split(refs)
  tile = query_tile(pl.program_id(0), sh, reverse)
  t0, bk = _first_position(offset_ref) + tile * sh.Bq, sh.block_k
  q = q_ref[...].reshape(sh.M, sh.Dkp)
  t = _row_positions(t0, sh)[:, None]
  start, starts = _tile_documents(start_ref, sh)
  c = scale * LOG2E   # scores in log2 units: exp2 instead of exp

  def body(kb, carry, masked):
    acc, m, l = carry
    j0 = kb * bk
    k = k_ref[pl.ds(j0, bk), :]
    v = v_ref[pl.ds(j0, bk), :]
    s = _util.dot(q, k, interpret=sh.interpret, contract=(1, 1)) * c
    m_new = m_safe = jnp.maximum(m, jnp.max(s, axis=1))
    if masked:
      j = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
      s = jnp.where(band.visible(t, j, sh.S, start), s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # row saw nothing yet
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _util.dot(p.astype(v.dtype), v, interpret=sh.interpret)
    return acc, m_new, l

  acc, m, l = _banded_loop(
      band.key_blocks(t0, t0 + sh.Bq - 1, sh.S, bk, starts), body,
      (jnp.zeros((sh.M, sh.Dvp), jnp.float32),
       jnp.full((sh.M,), -jnp.inf, jnp.float32),
       jnp.zeros((sh.M,), jnp.float32)))
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype).reshape(
      sh.Bq, sh.Gp, sh.Dvp)
  lse = jnp.where(seen, (m + jnp.log2(l_safe)) / LOG2E, -jnp.inf)
  lse_ref[...] = lse.reshape(sh.Bq, sh.Gp)


def _probs(a, b, lse2, c, masked, band, t, j, start, sh):
  """p = exp(s - lse) of one tile, s = scale * a b^T (a, b = q, k or k, q);
  lse2 in log2 units, t, j and start (s(t), or None) broadcast to s. Masked
  entries are 0, which also covers rows that see nothing (lse = -inf)."""
  p = jnp.exp2(_util.dot(a, b, interpret=sh.interpret, contract=(1, 1)) * c - lse2)
  return jnp.where(band.visible(t, j, sh.S, start), p, 0.0) if masked else p


def dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
              band: Band, sh: Shapes, scale: float, reverse: bool, inputs: Inputs):
  start_ref, _, offset_ref, (dq_ref,) = inputs.split(refs)
  tile = query_tile(pl.program_id(0), sh, reverse)
  t0, bk = _first_position(offset_ref) + tile * sh.Bq, sh.block_k
  q = q_ref[...].reshape(sh.M, sh.Dkp)
  do = do_ref[...].reshape(sh.M, sh.Dvp)
  lse2 = lse_ref[...].reshape(sh.M, 1)
  delta = delta_ref[...].reshape(sh.M, 1)
  t = _row_positions(t0, sh)[:, None]
  start, starts = _tile_documents(start_ref, sh)
  c = scale * LOG2E

  def body(kb, dq, masked):
    j0 = kb * bk
    k = k_ref[pl.ds(j0, bk), :]
    v = v_ref[pl.ds(j0, bk), :]
    j = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    p = _probs(q, k, lse2, c, masked, band, t, j, start, sh)
    ds = p * (_util.dot(do, v, interpret=sh.interpret, contract=(1, 1)) - delta)
    return dq + _util.dot(ds.astype(k.dtype), k, interpret=sh.interpret)

  dq = _banded_loop(band.key_blocks(t0, t0 + sh.Bq - 1, sh.S, bk, starts), body,
                    jnp.zeros((sh.M, sh.Dkp), jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype).reshape(sh.Bq, sh.Gp, sh.Dkp)


def dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               band: Band, sh: Shapes, scale: float, splits: int, inputs: Inputs):
  start_ref, end_ref, offset_ref, (dk_ref, dv_ref) = inputs.split(refs, ends=True)
  # The third grid axis packs (batch, split); split s takes query chunk s.
  kb, split = pl.program_id(0), pl.program_id(2) % splits
  bk, bq = sh.block_k, sh.Bq
  j0 = kb * bk
  q0 = _first_position(offset_ref)
  k = k_ref[...]
  v = v_ref[...]
  j = j0 + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
  ends = None
  if end_ref is not None:
    key_end = end_ref[...]
    ends = (jnp.min(key_end), jnp.max(key_end))
  chunk = pl.cdiv(sh.num_q_tiles, splits)
  tiles = tuple(jnp.clip(x, split * chunk, (split + 1) * chunk)
                for x in band.query_tiles(j0, j0 + bk - 1, sh.T, sh.S, bq, q0, ends))
  c = scale * LOG2E

  def body(tile, carry, masked):
    # Transposed tiles ([keys, rows]): every dot takes its register operand
    # as is, q and do enter transposed from memory.
    dk, dv = carry
    t0 = tile * bq
    q = q_ref[pl.ds(t0, bq)].reshape(sh.M, sh.Dkp)
    do = do_ref[pl.ds(t0, bq)].reshape(sh.M, sh.Dvp)
    lse2 = lse_ref[pl.ds(t0, bq)].reshape(1, sh.M)
    delta = delta_ref[pl.ds(t0, bq)].reshape(1, sh.M)
    t = _row_positions(q0 + t0, sh)[None, :]
    start = None if start_ref is None else _token_rows(start_ref[pl.ds(t0, bq)], sh)[None, :]
    p_t = _probs(k, q, lse2, c, masked, band, t, j, start, sh)
    dv = dv + _util.dot(p_t.astype(do.dtype), do, interpret=sh.interpret)
    ds_t = p_t * (_util.dot(v, do, interpret=sh.interpret, contract=(1, 1)) - delta)
    dk = dk + _util.dot(ds_t.astype(q.dtype), q, interpret=sh.interpret)
    return dk, dv

  dk, dv = _banded_loop(tiles, body,
                        (jnp.zeros((bk, sh.Dkp), jnp.float32),
                         jnp.zeros((bk, sh.Dvp), jnp.float32)))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
