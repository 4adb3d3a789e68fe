"""Fused importance scores and top-n block selection (paper §3.3.2, Eq. 8-11).

The kernel behind `nsa_jax.select_blocks(..., impl="pallas")`; reference: `select_blocks_xla`
in `nsa_jax/ops/selection.py` (the same selection up to near-ties of the summation order,
docs/semantics.md#near-ties). One program per (query tile of Bq tokens, KV group, batch
row): the tile's tokens are the rows of every matmul and the group's heads a loop; pass 1
computes each head's lse (skipped when the compressed branch's lse is given), pass 2 maps
p = exp(s - lse) onto chunks of selection blocks with the overlap matrix (the heads' p summed
first, Eq. 10; with `sizes.group_score == "max"` each head's mapped and the max kept) and
keeps a running top-n in registers (`_merge_top_n`). Only the [T, n] indices reach memory.
No custom_vjp: the output is integer. Design: docs/kernels.md#selection-kernel.
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


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes and launch parameters.

  Attributes:
    block_q: query tokens per program, the rows of every matmul; a power of
      2 >= 16 (shrunk to the next power of 2 >= T for short sequences).
    block_k: compressed keys per tile; a power of 2 >= 16. Fixes the chunk of
      selection blocks scored per step, (block_k - l/d + 1) // (l'/d): 15 for
      the paper's sizes at 64, 31 at 128. 64 is best when the kernel
      computes its own lse, 128 when it is given (`WITH_LSE`).
    num_warps, num_stages: Triton launch parameters (4 warps measured best:
      experiments/PERF_NOTES.md, "Measurements behind the code's defaults").
  """

  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"Tiles.{name}={value!r} must be a power of 2 >= 16")
    if not isinstance(self.num_warps, int) or self.num_warps < 1 or (
        self.num_warps & (self.num_warps - 1)):
      raise ValueError(f"Tiles.num_warps={self.num_warps!r} must be a power of 2")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"Tiles.num_stages={self.num_stages!r} must be an int >= 1")


# Tiles when the caller passes the compressed branch's lse (as `nsa` does): no
# lse pass, so longer chunks pay
# (experiments/PERF_NOTES.md, "Measurements behind the code's defaults").
WITH_LSE = Tiles(block_k=128)


def _merge_top_n(vals, idx, run_vals, run_idx):
  """Inserts a chunk's candidates (vals, idx) [Bq, Sc] into the running top-n.

  run_vals, run_idx [Bq, NP] hold the n best (value, index) pairs seen so far
  (a set, unsorted), ordered by value and then by lower index; empty slots
  hold -inf with distinct negative indices, padding slots (>= n) +inf.
  Each pass takes the chunk's best remaining entry (highest value, lowest
  index) and, where it beats the set's worst entry (lowest value, and the
  highest index among equal values), puts it in that entry's slot. Chunk
  indices exceed every index in the set, so an equal value never wins: `>`.
  Entries that do not beat the initial worst can never enter, so the
  passes needed are at most the largest such count over the rows (and the
  set size): usually a few once the set is full, instead of n.
  """
  big = jnp.iinfo(jnp.int32).max
  worst = jnp.min(run_vals, axis=1)[:, None]
  num_passes = jnp.minimum(
      jnp.max(jnp.sum((vals > worst).astype(jnp.int32), axis=1)),
      run_vals.shape[1])

  def insert(_, carry):
    vals, run_vals, run_idx = carry
    best = jnp.max(vals, axis=1)[:, None]
    pick = jnp.min(jnp.where(vals == best, idx, big), axis=1)[:, None]
    worst = jnp.min(run_vals, axis=1)[:, None]
    evict = jnp.max(jnp.where(run_vals == worst, run_idx, -big), axis=1)[:, None]
    replace = (run_idx == evict) & (best > worst)
    run_vals = jnp.where(replace, best, run_vals)
    run_idx = jnp.where(replace, pick, run_idx)
    vals = jnp.where(idx == pick, -jnp.inf, vals)
    return vals, run_vals, run_idx

  _, run_vals, run_idx = lax.fori_loop(0, num_passes, insert,
                                       (vals, run_vals, run_idx))
  return run_vals, run_idx


def _select_kernel(*refs, sizes: Selection, scale: float, seq_len: int,
                   num_cmp: int, group: int, chunk: int, block_k: int,
                   num_tiles: int, dtype, optional: tuple[bool, bool, bool]):
  """One (query tile, KV group, batch) program.

  refs: q_ref [Bq, G, Dk] (this tile and group), k_ref [Lk, Dk] (this group's
  padded compressed keys, row r = compressed block r - (l/d - 1)), then where
  `optional` (lse, documents, offset) says so: lse_ref [Bq, GP] (the given lse of
  this tile and group; pass 1 is skipped then), start_ref [Bq] (s(t) of the
  tile's queries), offset_ref [1] (position of query 0); last o_ref [Bq, NP].
  """
  q_ref, k_ref, *refs, o_ref = refs
  lse_ref, start_ref, offset_ref = (refs.pop(0) if flag else None for flag in optional)
  l, d, lp = sizes.compress_block, sizes.compress_stride, sizes.select_block
  front = l // d - 1                       # zero rows in front of k_ref
  per_select = lp // d
  block_q = q_ref.shape[0]
  chunk_pad = _util.next_pow2(chunk, 16)
  n = sizes.num_selected
  n_pad = o_ref.shape[1]
  group_pad = _util.next_pow2(group)

  tile = num_tiles - 1 - pl.program_id(0)   # longest tiles first
  q0 = 0 if offset_ref is None else offset_ref[0]
  t = q0 + tile * block_q + jnp.arange(block_q, dtype=jnp.int32)        # [Bq]
  t_last = q0 + jnp.minimum(tile * block_q + block_q - 1, seq_len - 1)
  # Compressed blocks visible to the tile's last query: i*d + l - 1 <= t_last.
  num_visible = jnp.minimum(
      _util.div(jnp.maximum(t_last - l + 1 + d, 0), d), num_cmp)
  # The first position and selection block of each query's document [Bq, 1] (0
  # for one document per row), and the tile's earliest block: both passes start there.
  doc_start = first = tile_first = 0
  if start_ref is not None:
    doc_start = start_ref[...][:, None]
    first = _util.div(doc_start, lp)
    tile_first = jnp.min(first)

  def scores(h, row0, i):
    """scale * q_h . k over k_ref rows row0.. (compressed blocks i), and visibility."""
    s = sum(plgpu.dot(q_ref[:, h, pl.ds(start, size)],
                      k_ref[pl.ds(row0, block_k), pl.ds(start, size)],
                      trans_b=True).astype(dtype)
            for start, size in _util.pow2_parts(q_ref.shape[-1])) * scale
    visible = ((i[None, :] * d >= doc_start) & (i[None, :] < num_cmp)
               & (i[None, :] * d + l - 1 <= t[:, None]))
    return s, visible

  # Pass 1: lse per (token, head) over the visible compressed blocks.
  head_col = jnp.arange(group_pad, dtype=jnp.int32)[None, :]

  def lse_of_head(h, lse):
    def body(kt, carry):
      m, total = carry
      i = kt * block_k + jnp.arange(block_k, dtype=jnp.int32)
      s, visible = scores(h, front + kt * block_k, i)
      s = jnp.where(visible, s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      total = (total * jnp.exp(m - m_safe)
               + jnp.sum(jnp.exp(s - m_safe[:, None]), axis=1))
      return m_new, total

    init = (jnp.full((block_q,), -jnp.inf, dtype), jnp.zeros((block_q,), dtype))
    m, total = lax.fori_loop(_util.div(tile_first * (lp // d), block_k),
                             _util.div(num_visible + block_k - 1, block_k), body, init)
    return jnp.where(head_col == h, (m + jnp.log(total))[:, None], lse)

  if lse_ref is not None:
    lse = lse_ref[...]
  else:
    lse = lax.fori_loop(0, group, lse_of_head,
                        jnp.zeros((block_q, group_pad), dtype))

  # Pass 2: block scores chunk by chunk, merged into a running top-n.
  current = _util.div(t, lp)[:, None]                                # [Bq, 1]
  num_chunks = _util.div(_util.div(t_last, lp) + chunk, chunk)

  def chunk_body(c, carry):
    run_vals, run_idx = carry
    row0 = c * chunk * per_select          # k_ref row of compressed block i0
    i0 = row0 - front
    i = i0 + jnp.arange(block_k, dtype=jnp.int32)

    weights = lambda: overlap_matrix(i0, block_k, c * chunk, chunk_pad, chunk, sizes, dtype)

    def probs(h):
      s, visible = scores(h, row0, i)
      lse_h = jnp.sum(jnp.where(head_col == h, lse, 0.0), axis=1)
      return jnp.where(visible, jnp.exp(s - lse_h[:, None]), 0.0)

    if sizes.group_score == "sum":   # Eq. 10: one overlap matmul of the heads' sum
      p_sum = lax.fori_loop(0, group, lambda h, p_sum: p_sum + probs(h),
                            jnp.zeros((block_q, block_k), dtype))
      block_scores = exact_dot(p_sum, weights())
    else:                            # each head's block scores, then their max
      w = weights()
      block_scores = lax.fori_loop(
          0, group, lambda h, best: jnp.maximum(best, exact_dot(probs(h), w)),
          jnp.zeros((block_q, chunk_pad), dtype))

    col = jnp.arange(chunk_pad, dtype=jnp.int32)[None, :]
    j = c * chunk + col                                            # [1, Sc]
    candidate = (j <= current) & (j >= first) & (col < chunk)
    forced = candidate & ((j < first + sizes.num_initial)
                          | (j > current - sizes.num_local))
    vals = jnp.where(forced, jnp.inf,
                     jnp.where(candidate, block_scores, -jnp.inf))
    return _merge_top_n(vals, jnp.broadcast_to(j, vals.shape),
                        run_vals, run_idx)

  slot = jnp.broadcast_to(jnp.arange(n_pad, dtype=jnp.int32)[None, :],
                          (block_q, n_pad))
  init = (jnp.where(slot < n, -jnp.inf, jnp.inf).astype(dtype), -1 - slot)
  run_vals, run_idx = lax.fori_loop(_util.div(tile_first, chunk), num_chunks, chunk_body,
                                    init)
  o_ref[...] = jnp.where((run_vals == -jnp.inf) | (slot >= n), -1, run_idx)


def _kernel_block_k(sizes: Selection, chunk: int) -> int:
  """Smallest power-of-2 key tile (>= 16) holding the blocks of `chunk` selection blocks."""
  front = sizes.strides_per_block - 1
  per_select = sizes.strides_per_select
  return _util.next_pow2(chunk * per_select + front, 16)


def _chunk_size(sizes: Selection, num_blocks: int, block_k: int) -> int:
  """Selection blocks per chunk: as many as one `block_k` key tile covers."""
  front = sizes.strides_per_block - 1
  per_select = sizes.strides_per_select
  fit = (block_k - front) // per_select
  return max(1, min(fit, num_blocks))


def shared_memory(tiles: Tiles, sizes: Selection, Dk: int, itemsize: int) -> int:
  """Estimated shared memory (bytes) of a program, counted from `_select_kernel` as
  Triton allocates it: a head's query tile (two copies: the head loop is pipelined),
  the compressed-key tile of a chunk, and `exact_dot`'s bf16 pieces of p and overlap
  weights."""
  chunk = _chunk_size(sizes, 1 << 30, tiles.block_k)
  tile_k, chunk_pad = _kernel_block_k(sizes, chunk), _util.next_pow2(chunk, 16)
  dk = _util.cdiv(Dk, 16) * 16
  return (itemsize * (2 * tiles.block_q + tile_k) * dk
          + 2 * (tiles.block_q * tile_k + tile_k * chunk_pad) + _util.SCRATCH_BYTES)


def default_tiles(q, sizes: Selection, lse_given: bool) -> Tiles | None:
  """`Tiles()`, or `WITH_LSE` when the lse is given, fitted to the device's shared
  memory: key tiles, then query tiles halved (16 at least) until `shared_memory`
  fits; unchanged where they fit, None where 16 x 16 tiles do not."""
  itemsize = jnp.dtype(q.dtype).itemsize
  return _util.fit_tiles(WITH_LSE if lse_given else Tiles(),
                         lambda t: shared_memory(t, sizes, q.shape[-1], itemsize),
                         (("block_k", 16), ("block_q", 16)))


def unsupported(q, k_cmp, *, sizes: Selection) -> str | None:
  """Why the kernel cannot take these (validated) inputs, or None."""
  if why := _util.dtype_unsupported(q.dtype):
    return why
  if default_tiles(q, sizes, lse_given=True) is None or default_tiles(q, sizes, False) is None:
    need = shared_memory(Tiles(block_q=16, block_k=16), sizes, q.shape[-1], q.dtype.itemsize)
    return (f"even 16 x 16 tiles need {need} bytes of shared memory per program for "
            f"Dk={q.shape[-1]}, {q.dtype}; the device has {_util.shared_memory_budget()}")
  return None


@functools.partial(jax.jit, static_argnames=("sizes", "scale", "interpret",
                                             "tiles"))
def select_blocks(q, k_cmp, *, sizes: Selection, scale: float,
                  interpret: bool, tiles: Tiles | None = None, lse=None, doc_start=None,
                  q_offset=None):
  """Top-n selection blocks per query and KV group; docs/kernels.md#selection-kernel.

  Args:
    q: [B, T, HQ, Dk]; k_cmp: [B, Tc, HKV, Dk], Tc compressed blocks of T tokens.
    sizes: the selection's block sizes; scale: logit scale (a python float).
    interpret: run the kernel in Pallas interpret mode (CPU).
    tiles: tile sizes and launch parameters (default: `default_tiles`).
    lse: optional [B, T, HQ] natural-log lse of the compressed branch (-inf
      where nothing is visible); when given, pass 1 is skipped.
    doc_start: optional [B, T] int32, the first position of each query's document
      (packed rows); None: one document per row.
    q_offset: optional int32 scalar, the position of query 0 (k_cmp from 0).

  Returns:
    block_idx [B, T, HKV, n] int32, -1 in unused slots, order free.
  """
  tiles = default_tiles(q, sizes, lse is not None) if tiles is None else tiles
  B, T, HQ, Dk = q.shape
  Tc, HKV = k_cmp.shape[1], k_cmp.shape[2]
  G = HQ // HKV
  n = sizes.num_selected
  dtype = jnp.promote_types(q.dtype, jnp.float32)

  # Selection blocks the queries can see: those of their T tokens, or with a query offset
  # those of the whole sequence, at most Tc*d + l - 1 tokens long (Tc compressed blocks).
  seq_len = T if q_offset is None else max(
      T, Tc * sizes.compress_stride + sizes.compress_block - 1)
  num_blocks = sizes.num_select_blocks(seq_len)
  chunk = _chunk_size(sizes, num_blocks, tiles.block_k)
  tile_k = _kernel_block_k(sizes, chunk)
  block_q = min(tiles.block_q, _util.next_pow2(T, 16))
  num_tiles = pl.cdiv(T, block_q)
  dk_pad = pl.cdiv(Dk, 16) * 16

  # Rows read: pass 1 up to front + ceil(Tc / tile_k) * tile_k, pass 2 up to
  # the last chunk's start + tile_k.
  front = sizes.strides_per_block - 1
  per_select = sizes.strides_per_select
  rows = max(front + pl.cdiv(Tc, tile_k) * tile_k,
             (pl.cdiv(num_blocks, chunk) - 1) * chunk * per_select + tile_k)
  q = jnp.pad(q, [(0, 0), (0, num_tiles * block_q - T), (0, 0), (0, dk_pad - Dk)])
  q = q.reshape(B, num_tiles * block_q, HKV, G, dk_pad)
  k_cmp = jnp.pad(k_cmp, [(0, 0), (front, rows - front - Tc), (0, 0),
                          (0, dk_pad - Dk)])

  n_pad = _util.next_pow2(n)
  group_pad = _util.next_pow2(G)
  inputs = [q, k_cmp]
  in_specs = [
      pl.BlockSpec((None, block_q, None, G, dk_pad),
                   lambda i, g, b: (b, num_tiles - 1 - i, g, 0, 0)),
      pl.BlockSpec((None, rows, None, dk_pad), lambda i, g, b: (b, 0, g, 0)),
  ]
  if lse is not None:
    # Padded queries and heads read 0: finite, and their results are dropped.
    lse = lse.astype(dtype).reshape(B, T, HKV, G)
    inputs.append(jnp.pad(lse, [(0, 0), (0, num_tiles * block_q - T), (0, 0),
                                (0, group_pad - G)]))
    in_specs.append(pl.BlockSpec((None, block_q, None, group_pad),
                                 lambda i, g, b: (b, num_tiles - 1 - i, g, 0)))
  if doc_start is not None:   # padded queries repeat the last one's
    inputs.append(jnp.pad(doc_start.astype(jnp.int32), [(0, 0), (0, num_tiles * block_q - T)],
                          mode="edge"))
    in_specs.append(pl.BlockSpec((None, block_q), lambda i, g, b: (b, num_tiles - 1 - i)))
  if q_offset is not None:
    inputs.append(jnp.reshape(q_offset, (1,)).astype(jnp.int32))
    in_specs.append(pl.BlockSpec((1,), lambda i, g, b: (0,)))
  kernel = functools.partial(
      _select_kernel, sizes=sizes, scale=scale, seq_len=T, num_cmp=Tc,
      group=G, chunk=chunk, block_k=tile_k, num_tiles=num_tiles, dtype=dtype,
      optional=(lse is not None, doc_start is not None, q_offset is not None))
  out = pl.pallas_call(
      kernel,
      grid=(num_tiles, HKV, B),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, block_q, None, n_pad),
                             lambda i, g, b: (b, num_tiles - 1 - i, g, 0)),
      out_shape=jax.ShapeDtypeStruct((B, num_tiles * block_q, HKV, n_pad),
                                     jnp.int32),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret,
      name="nsa_select_blocks",
  )(*inputs)
  return _util.saved(out[:, :T, :, :n])
