"""Top-n block selection (paper §3.3.2, Eq. 8-11): importance scores mapped onto selection
blocks by overlap, summed over each KV group, the n best candidates kept with the initial and
local blocks forced in (docs/semantics.md#importance-scores, #selection).

`nsa` and `select_blocks` take p_cmp from one lse, `selection_lse`, so that they select the
same blocks bit for bit (docs/semantics.md#one-selection). The Pallas kernel is
`pallas_kernels/select_blocks.py`.
The heads of a group are summed (paper Eq. 10) or their max taken (`config.group_score`,
docs/selection_learning.md#group-aggregation). The selection carries no gradient;
`selected_scores` gives the selected blocks' scores one through the straight-through gate
(docs/selection_learning.md#straight-through-gate).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common, dispatch, segments
from nsa_jax.ops.compressed import _compressed_attention, check_inputs, compressed_scores
from pallas_kernels import compressed_attention as compressed_kernel
from pallas_kernels import select_blocks as kernel

QUERY_CHUNK = 256


def select_blocks(q, k_cmp, *, config: NSAConfig, scale: float | None = None,
                  impl: str = "auto", interpret: bool | None = None, lse=None,
                  segment_ids=None, q_offset=None):
  """Indices of the selection blocks each query's KV group attends to.

  Args:
    q: [B, T, HQ, Dk]; k_cmp: [B, Tc, HKV, Dk], Tc = config.num_compressed(T).
    lse: optional [B, T, HQ] lse of the compressed branch as `selection_lse`
      gives it for these q and k_cmp (`nsa` passes its own); computed here by
      `selection_lse` otherwise, which runs the compressed branch (its output
      is not needed, its cost is).
    impl: "xla" (reference), "pallas" (kernel) or "auto" (the kernel on a GPU
      where it takes the inputs, else the reference; `nsa_jax.ops.dispatch`).
      The lse `selection_lse` computes is that of `nsa(impl=impl)`.
    segment_ids: [B, T] int, packed documents (docs/semantics.md#packed-rows; see
      `compressed_attention`), or None.
    q_offset: private (context parallelism, `nsa_jax.context`; see
      `compressed_attention`): q holds the queries at positions q_offset .. of a
      sequence whose compressed blocks k_cmp and segment_ids [B, S] are whole.

  Returns:
    block_idx [B, T, HKV, n] int32, `-1` in unused slots; order is free.
    Carries no gradient.
  """
  check_inputs(q, k_cmp, k_cmp, config=config, q_offset=q_offset, names=("q", "k_cmp", "k_cmp"))
  sliced = q_offset is not None
  if lse is not None:
    if getattr(lse, "shape", None) != q.shape[:3]:
      raise ValueError(f"lse.shape={getattr(lse, 'shape', None)} must be "
                       f"[B, T, HQ]={q.shape[:3]}")
  doc_start, doc_end = segments.documents(segment_ids, q, config.select_block, q_offset)
  backend = dispatch.choose("select_blocks", impl, dispatch.Call(
      dict(q=q, k_cmp=k_cmp), config, interpret, segment_ids is not None, sliced))
  scale = _common.resolve_scale(scale, q)
  if lse is None:   # no gradient: the selection carries none
    lse = _selection_lse(
        lax.stop_gradient(q), lax.stop_gradient(k_cmp), config=config, scale=scale, interpret=interpret, doc_start=doc_start,
        doc_end=doc_end, q_offset=q_offset,
        backend=lse_backend(q, k_cmp, config=config, impl=impl, interpret=interpret,
                            packed=segment_ids is not None, offset=sliced))
  return _select_blocks(q, k_cmp, lse, config=config, scale=scale, backend=backend,
                        interpret=interpret, doc_start=doc_start, q_offset=q_offset)


def _select_blocks(q, k_cmp, lse, *, config: NSAConfig, scale: float, backend: str,
                   interpret: bool | None, doc_start=None, q_offset=None):
  """`select_blocks` of checked inputs and their `selection_lse` on `backend`
  (`dispatch.choose`'s), packed rows given by s(t) (`segments.bounds`); checks nothing
  (`nsa` checks once)."""
  q, k_cmp, lse = lax.stop_gradient(q), lax.stop_gradient(k_cmp), lax.stop_gradient(lse)
  if backend == "pallas":
    return kernel.select_blocks(q, k_cmp, sizes=_common.selection_sizes(config), scale=scale,
                                interpret=_common.resolve_interpret(interpret),
                                lse=lse, doc_start=doc_start, q_offset=q_offset)
  # A slice's sequence holds at most Tc*d + l - 1 tokens (Tc blocks, the next incomplete).
  sliced = q_offset is not None
  return select_blocks_xla(
      q, k_cmp, config=config, scale=scale, lse=lse, doc_start=doc_start,
      first=0 if q_offset is None else q_offset,
      seq_len=k_cmp.shape[1] * config.compress_stride + config.compress_block - 1
      if sliced else None)


def selection_lse(q, k_cmp, *, config: NSAConfig, scale: float, impl: str,
                  interpret: bool | None = None, branch=None, segment_ids=None,
                  q_offset=None):
  """The [B, T, HQ] lse the selection of `nsa(impl=impl)` is computed from
  (docs/semantics.md#one-selection): that of the compressed branch on (q, k_cmp, k_cmp),
  run on the backend `nsa(impl=impl)` gives the branch (`dispatch.nsa_branches`). The lse
  does not depend on the values, so values as wide as the keys stand for any.
  branch: optional (v_cmp, backend, lse) of the compressed branch `nsa` ran on these q
  and k_cmp (`_selection_lse`). segment_ids: packed rows, or None; q_offset: a slice
  of the queries (`compressed_attention`), or None. Checks as `compressed_attention` does.
  """
  check_inputs(q, k_cmp, k_cmp, config=config, q_offset=q_offset, names=("q", "k_cmp", "k_cmp"))
  sliced = q_offset is not None
  doc_start, doc_end = segments.documents(segment_ids, q, config.select_block, q_offset)
  backend = lse_backend(q, k_cmp, config=config, impl=impl, interpret=interpret,
                        packed=segment_ids is not None, offset=sliced)
  return _selection_lse(q, k_cmp, config=config, scale=scale, backend=backend,
                        interpret=interpret, branch=branch, doc_start=doc_start,
                        doc_end=doc_end, q_offset=q_offset)


def _selection_lse(q, k_cmp, *, config: NSAConfig, scale: float, backend: str,
                   interpret: bool | None, branch=None, doc_start=None, doc_end=None,
                   q_offset=None):
  """`selection_lse` of checked inputs on `backend` (`lse_backend`'s); checks nothing.

  branch: optional (v_cmp, backend, lse) of the compressed branch `nsa` already
  ran on these q and k_cmp; its lse is the answer where it is that call's to the
  bit (`_same_lse`), which is always the case but for Dv > Dk (16-bit on a GPU,
  cuDNN then refuses the branch; or a Pallas forward tile narrowed by Dv): then
  the lse is computed here as `select_blocks` computes it, at the cost of a
  second compressed pass.
  """
  if branch is not None:
    v_cmp, branch_backend, lse = branch
    if branch_backend == backend and _same_lse(backend, q, k_cmp, v_cmp):
      return lse
  return _compressed_attention(q, k_cmp, k_cmp, config=config, scale=scale, backend=backend,
                               interpret=interpret, doc_start=doc_start, doc_end=doc_end,
                               q_offset=q_offset)[1]


def lse_backend(q, k_cmp, *, config: NSAConfig, impl: str, interpret: bool | None = None,
                packed: bool = False, offset: bool = False) -> str:
  """The backend `selection_lse` runs the compressed branch on (q, k_cmp, k_cmp):
  the one `nsa(impl=impl)` gives that branch (`dispatch.nsa_branches`) on rows packed
  or not (segment ids given), at a query offset or not."""
  call = dispatch.Call(dict(q=q, k_cmp=k_cmp, v_cmp=k_cmp), config, interpret, packed,
                       offset)
  return dispatch.nsa_branches(impl, {"compressed_attention": call})["compressed_attention"]


def _same_lse(backend: str, q, k_cmp, v_cmp) -> bool:
  """Whether `backend` computes the compressed branch's lse over values v_cmp as
  over k_cmp, to the bit: the reference and cuDNN (v zero-padded to Dk) always;
  the Pallas kernel where its forward tiles do not depend on Dv (they narrow
  where Dk + Dv crowd shared memory: `_flash_tiles.fit_tiles`)."""
  if backend != "pallas":
    return True
  tiles = [compressed_kernel.default_tiles(q, k_cmp, v) for v in (v_cmp, k_cmp)]
  return len({(t.block_m, t.block_k) for t in tiles}) == 1


def overlap_to_select_blocks(p, config: NSAConfig, num_blocks: int):
  """Maps [..., Tc] compressed-block mass to [..., num_blocks] selection-block mass.

  Block i covers strides i .. i + l/d - 1; selection block j covers strides
  j*l'/d .. (j+1)*l'/d - 1; the overlap in strides is the weight. So spread
  each p_i over its strides (a box filter of width l/d), then sum the strides
  of each selection block. For l=32, d=16, l'=64: weights 1,2,2,2,1 on
  i = 4j-1 .. 4j+3.
  """
  per_block = config.compress_block // config.compress_stride
  per_select = config.select_block // config.compress_stride
  num_strides = num_blocks * per_select
  Tc = p.shape[-1]
  lead = [(0, 0)] * (p.ndim - 1)
  p = jnp.pad(p, lead + [(per_block - 1, num_strides - Tc)])
  strides = sum(p[..., per_block - 1 - k: per_block - 1 - k + num_strides]
                for k in range(per_block))
  return strides.reshape(*strides.shape[:-1], num_blocks, per_select).sum(-1)


def candidate_blocks(t, num_blocks: int, config: NSAConfig, doc_start=None):
  """(candidate, forced) masks [C, num_blocks] of the queries at positions t [C]
  (Eq. 11): candidates s(t) <= j*l' <= t, forced the first num_initial of them and
  the num_local last; with doc_start [B, C] (s(t); 0 without), [B, 1, C, num_blocks]."""
  lp = config.select_block
  j = jnp.arange(num_blocks)[None, :]
  cur = (t // lp)[:, None]
  first = 0
  if doc_start is not None:   # [B, 1, C, 1] against [1, 1, C, Ts]
    j, cur, first = j[None, None], cur[None, None], (doc_start // lp)[:, None, :, None]
  candidate = (j <= cur) & (j >= first)
  forced = candidate & ((j < first + config.num_initial) | (j > cur - config.num_local))
  return candidate, forced


def rank_blocks(scores, t, config: NSAConfig, doc_start=None):
  """Top-n of [..., C, Ts] block scores for queries at positions t [C].

  Non-candidates (j*l' > t; with doc_start [B, C], scores [B, HKV, C, Ts], also
  j*l' < s(t)) score -inf, forced blocks (the first num_initial candidates, the
  num_local last ones) +inf; ties go to the lower index (lax.top_k keeps the
  lower index first). Returns int32 [..., C, n].
  """
  n = config.num_selected
  Ts = scores.shape[-1]
  candidate, forced = candidate_blocks(t, Ts, config, doc_start)
  s = jnp.where(forced, jnp.inf, jnp.where(candidate, scores, -jnp.inf))
  if Ts < n:
    s = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, n - Ts)],
                constant_values=-jnp.inf)
  vals, idx = lax.top_k(s, n)
  return jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)


def group_block_scores(p, config: NSAConfig, num_blocks: int):
  """A KV group's block scores [B, HKV, ..., num_blocks] from p [B, HKV, G, ..., Tc].

  "sum" (Eq. 10): the heads' p_cmp summed, then mapped to selection blocks (Eq. 9;
  the map is linear, so this is the sum of the heads' p_slc); "max": each head's
  p_slc, then the max over the heads (config.group_score).
  """
  if config.group_score == "sum":
    return overlap_to_select_blocks(p.sum(axis=2), config, num_blocks)
  return overlap_to_select_blocks(p, config, num_blocks).max(axis=2)


def importance_scores(qc, start, k_cmp, config: NSAConfig, scale: float, num_blocks: int,
                      doc_start=None, lse=None):
  """Block scores [B, HKV, C, num_blocks] (Eq. 8-10) of the query chunk qc [B, C, HQ, Dk]
  at positions start ..: p_cmp as `compressed_probabilities` gives it (with the
  compressed branch's lse [B, C, HQ] where given), aggregated by `group_block_scores`.
  doc_start [B, C]: packed rows, or None. Differentiable in qc and k_cmp (lse aside).
  """
  B, C = qc.shape[:2]
  if k_cmp.shape[1] == 0:
    return jnp.zeros((B, k_cmp.shape[2], C, num_blocks), _common.compute_dtype(qc.dtype))
  s, mask = compressed_scores(qc, start, k_cmp, config, scale, doc_start)
  return group_block_scores(compressed_probabilities(s, mask, lse), config, num_blocks)


def selected_scores(q, k_cmp, block_idx, *, config: NSAConfig, scale: float,
                    doc_start=None, q_offset=None, query_chunk: int = QUERY_CHUNK):
  """Normalised importance scores [B, T, HKV, n] of the selected blocks, differentiable
  in q and k_cmp: the straight-through gate's s
  (docs/selection_learning.md#straight-through-gate; `nsa` adds s - stop_gradient(s), 0, to the scores of each
  slot's keys),

      s[t, g, slot] = score[t, g, b] / (l/d * (G for "sum", 1 for "max")),

  b = block_idx[t, g, slot], score as `importance_scores` gives it with the compressed
  branch's own softmax (a slot of -1 reads block 0: the selected branch masks it).
  Arguments as `select_blocks`'s, checked; doc_start: s(t) of packed rows
  (`segments.bounds`), or None; q_offset: q holds the queries from that position.
  """
  B, T, HQ, _ = q.shape
  HKV = k_cmp.shape[2]
  sliced = q_offset is not None
  seq_len = (k_cmp.shape[1] * config.compress_stride + config.compress_block - 1
             if sliced else T)
  Ts = config.num_select_blocks(seq_len)
  norm = config.compress_block // config.compress_stride * (
      HQ // HKV if config.group_score == "sum" else 1)

  def chunk_fn(start, qc, bc, *doc_c):
    scores = importance_scores(qc, start, k_cmp, config, scale, Ts, *doc_c) / norm
    return jnp.take_along_axis(jnp.moveaxis(scores, 1, 2), jnp.clip(bc, 0, Ts - 1), axis=-1)

  xs = (q, block_idx.astype(jnp.int32)) + ((doc_start,) if doc_start is not None else ())
  return _common.map_query_chunks(chunk_fn, xs, query_chunk, 0 if q_offset is None else q_offset)


def compressed_probabilities(s, mask, lse=None):
  """p_cmp (Eq. 8) from scores s [B, HKV, G, C, Tc] and visibility mask [C, Tc].

  With lse [B, C, HKV*G] given (the compressed branch's), p = exp(s - lse) on
  visible entries; otherwise the masked softmax of s.
  """
  if lse is None:
    return _common.masked_softmax(s, mask)[0]
  B, HKV, G, C, _ = s.shape
  lse = jnp.moveaxis(lse.reshape(B, C, HKV, G), 1, 3)[..., None].astype(s.dtype)
  return jnp.exp(jnp.where(mask, s - lse, -jnp.inf))


def select_blocks_xla(q, k_cmp, *, config: NSAConfig, scale: float, lse=None,
                      query_chunk: int = QUERY_CHUNK, doc_start=None, first=0,
                      seq_len: int | None = None):
  """Pure-JAX reference: [T, Tc] scores exist one query chunk at a time.

  lse: optional [B, T, HQ] lse of the compressed branch (see `select_blocks`).
  doc_start: [B, T] int, the first position of each query's document (packed
  rows, `segments.document_starts`), or None.
  first: position of q's first row, for a slice of the queries of a sequence of
  `seq_len` tokens (default: q's; all its compressed blocks given; any larger
  seq_len selects the same: blocks past a query are never its candidates).
  """
  Ts = config.num_select_blocks(q.shape[1] if seq_len is None else seq_len)

  def chunk_fn(start, qc, *rest):
    lse_c = rest[0] if lse is not None else None
    doc_c = rest[-1] if doc_start is not None else None
    t = start + jnp.arange(qc.shape[1])
    scores = importance_scores(qc, start, k_cmp, config, scale, Ts, doc_c, lse_c)
    return jnp.moveaxis(rank_blocks(scores, t, config, doc_c), 1, 2)   # [B, C, HKV, n]

  xs = (q,) + ((lse,) if lse is not None else ()) + ((doc_start,) if doc_start is not None else ())
  return _common.map_query_chunks(chunk_fn, xs, query_chunk, first)
