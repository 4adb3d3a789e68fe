"""Selection distillation: a loss that teaches the importance scores (paper §3.3.2,
Eq. 8-10) where dense attention looks (docs/selection_learning.md#selection-distillation).

Per query t and KV group g, over the *free* candidate blocks F(t) (the candidates
s(t) <= j*l' <= t that Eq. 11 does not force in; those compete for the n slots):

    teacher[j] ∝ sum_{k in block j} (1/G) sum_{h in g} softmax_{k' <= t}(scale q_h.k_slc[k'])[k]
    student[j] ∝ score[t, g, j]     (Eq. 8-10, heads aggregated as config.group_score says)
    loss = mean over (b, t, g) with F(t) non-empty of KL(teacher || student)

both normalised over F(t); the teacher carries no gradient. Computed one query chunk
at a time: the [T, T] attention never exists whole. With a query stride k, only every
k-th chunk counts (counted back from the last): the teacher's cost falls k-fold.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common, segments
from nsa_jax.ops.selection import candidate_blocks, importance_scores

QUERY_CHUNK = 128


def selection_distill_loss(q, k_cmp, k_slc, *, config: NSAConfig, scale: float | None = None,
                           segment_ids=None, query_chunk: int = QUERY_CHUNK,
                           query_stride: int = 1):
  """KL(dense attention's block mass || NSA's importance scores), a scalar (module doc).

  Args:
    q: [B, T, HQ, Dk]; k_cmp: [B, Tc, HKV, Dk], Tc = config.num_compressed(T);
      k_slc: [B, T, HKV, Dk], the selected branch's keys (the teacher attends to them).
    scale: logit scale of both (default Dk**-0.5), as `nsa`'s.
    segment_ids: [B, T] int, packed documents (`nsa`'s contract): teacher, student
      and candidates are those of t's document. None: one document per row.
    query_chunk: queries per chunk; memory O(chunk * T * HQ).
    query_stride: the loss over the queries of every query_stride-th chunk of query_chunk
      positions, counted back from the last chunk (1: every query); the mean is over
      those queries (docs/selection_learning.md#selection-distillation).

  Returns:
    The loss in the compute dtype (float32, or float64 for float64 inputs).
    Its gradient reaches q and k_cmp (through the student), not k_slc.
  """
  _common.check_config(config)
  _common.check_attention_inputs(q, k_slc, k_slc, names=("q", "k_slc", "k_slc"))
  _common.check_attention_inputs(q, k_cmp, k_cmp, names=("q", "k_cmp", "k_cmp"),
                                 seq_len=config.num_compressed(q.shape[1]))
  for name, value in (("query_chunk", query_chunk), ("query_stride", query_stride)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be an int >= 1")
  doc_start, _ = segments.documents(segment_ids, q, config.select_block)
  scale = _common.resolve_scale(scale, q)
  T = q.shape[1]
  Ts = config.num_select_blocks(T)
  chunk = min(query_chunk, T)
  n = -(-T // chunk)
  first = (n - 1) % query_stride      # the picked chunks: first, first + k, .., n - 1

  def chunk_fn(start, qc, *doc):
    doc_c = doc[0] if doc else None
    if query_stride > 1:   # `start` counts the picked chunks only
      start = (first + start // chunk * query_stride) * chunk
    t = start + jnp.arange(qc.shape[1])
    candidate, forced = candidate_blocks(t, Ts, config, doc_c)
    free = candidate & ~forced                       # [C, Ts] or [B, 1, C, Ts]
    free = free & (t < T).reshape((1,) * (free.ndim - 2) + (-1, 1))   # not past T
    teacher = lax.stop_gradient(_block_attention(qc, start, k_slc, scale, Ts, config, doc_c))
    student = importance_scores(qc, start, k_cmp, config, scale, Ts, doc_c)
    kl = _kl(teacher, student, free)                 # [B, HKV, C]
    has_free = jnp.broadcast_to(jnp.any(free, axis=-1), kl.shape)
    return jnp.moveaxis(kl, 1, 2), jnp.moveaxis(has_free, 1, 2).astype(kl.dtype)

  xs = (q,) + (() if doc_start is None else (doc_start,))
  if query_stride > 1:     # the picked chunks' rows, one after another
    picked = -(-(n - first) // query_stride)
    xs = tuple(_common.join_rows(_common.split_rows(x, n, chunk)[first::query_stride],
                                 picked * chunk) for x in xs)
  kl, counted = _common.map_query_chunks(chunk_fn, xs, chunk)
  return kl.sum() / jnp.maximum(counted.sum(), 1)


def _block_attention(qc, start, k, scale: float, num_blocks: int, config: NSAConfig,
                     doc_start=None):
  """[B, HKV, C, num_blocks]: causal softmax attention of the chunk's queries over k
  (in their document), averaged over each group's heads, summed per selection block."""
  B, C, HQ, Dk = qc.shape
  T, HKV = k.shape[1], k.shape[2]
  dt = _common.compute_dtype(qc.dtype)
  qg = qc.reshape(B, C, HKV, HQ // HKV, Dk)
  s = jnp.einsum("bchgd,bkhd->bhgck", qg, k, preferred_element_type=dt).astype(dt) * scale
  t, key = start + jnp.arange(C), jnp.arange(T)
  mask = key[None, :] <= t[:, None]                                      # [C, T]
  if doc_start is not None:
    mask = (mask[None] & (key[None, None, :] >= doc_start[:, :, None]))[:, None, None]
  p = _common.masked_softmax(s, mask)[0].mean(axis=2)                    # [B, HKV, C, T]
  p = jnp.pad(p, [(0, 0)] * 3 + [(0, num_blocks * config.select_block - T)])
  return p.reshape(B, HKV, C, num_blocks, config.select_block).sum(-1)


def _kl(teacher, student, free):
  """KL(teacher || student) [...] of [..., Ts] masses both normalised over `free`;
  0 where nothing is free. The student's normalised mass is floored at the smallest
  normal number of its dtype inside the log (a score that underflowed to 0)."""
  tiny = jnp.finfo(student.dtype).tiny
  total = lambda x: jnp.sum(jnp.where(free, x, 0.0), axis=-1, keepdims=True)
  t_sum, s_sum = total(teacher), total(student)
  t = jnp.where(free, teacher, 0.0) / jnp.where(t_sum > 0, t_sum, 1.0)
  s = jnp.where(free, student, 0.0) / jnp.where(s_sum > 0, s_sum, 1.0)
  log_ratio = jnp.log(jnp.where(t > 0, t, 1.0)) - jnp.log(jnp.maximum(s, tiny))
  return jnp.sum(jnp.where(t > 0, t * log_ratio, 0.0), axis=-1)
