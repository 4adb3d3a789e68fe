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

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common, dispatch, segments
from nsa_jax.ops.selection import candidate_blocks, importance_scores
from pallas_kernels import _util
from pallas_kernels import block_lse as kernel

QUERY_CHUNK = 128


def selection_distill_loss(q, k_cmp, k_slc, *, config: NSAConfig, scale: float | None = None,
                           segment_ids=None, query_chunk: int = QUERY_CHUNK,
                           query_stride: int = 1, impl: str = "auto",
                           interpret: bool | None = None):
  """KL(dense attention's block mass || NSA's importance scores), a scalar (module doc).

  Args:
    q: [B, T, HQ, Dk]; k_cmp: [B, Tc, HKV, Dk], Tc = config.num_compressed(T);
      k_slc: [B, T, HKV, Dk], the selected branch's keys (the teacher attends to them).
    scale: logit scale of both (default Dk**-0.5), as `nsa`'s.
    segment_ids: [B, T] int, packed documents (`nsa`'s contract): teacher, student
      and candidates are those of t's document. None: one document per row.
    query_chunk: queries per chunk; memory O(chunk * T * HQ) on the reference.
    query_stride: the loss over the queries of every query_stride-th chunk of query_chunk
      positions, counted back from the last chunk (1: every query); the mean is over
      those queries (docs/selection_learning.md#selection-distillation).
    impl: the teacher's backend, "xla" (reference: `block_lse_xla`), "pallas"
      (`pallas_kernels/block_lse.py`) or "auto" (`nsa_jax.ops.dispatch`).

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
  backend = dispatch.choose("distill_teacher", impl, dispatch.Call(
      dict(q=q, k=k_slc), config, interpret, segment_ids is not None))
  doc_start, _ = segments.documents(segment_ids, q, config.select_block)
  scale = _common.resolve_scale(scale, q)
  T = q.shape[1]
  Ts = config.num_select_blocks(T)
  chunk = min(query_chunk, T)
  n = -(-T // chunk)
  picked = range((n - 1) % query_stride, n, query_stride)   # back from the last chunk
  positions = jnp.asarray(np.concatenate([c * chunk + np.arange(chunk) for c in picked]),
                          jnp.int32)
  rows = lambda x: _common.join_rows(_common.split_rows(x, n, chunk)[picked.start::query_stride],
                                     len(picked) * chunk)
  q, positions = rows(q), positions[None]
  doc_start = None if doc_start is None else rows(doc_start)
  teacher = block_teacher(q, positions, k_slc, doc_start=doc_start, scale=scale, config=config,
                          chunk=chunk, backend=backend, interpret=interpret)

  def chunk_fn(_, qc, tc, pos, *doc):
    doc_c = doc[0] if doc else None
    t = pos[0]
    candidate, forced = candidate_blocks(t, Ts, config, doc_c)
    free = candidate & ~forced                       # [C, Ts] or [B, 1, C, Ts]
    free = free & (t < T).reshape((1,) * (free.ndim - 2) + (-1, 1))   # not past T
    student = importance_scores(qc, t[0], k_cmp, config, scale, Ts, doc_c)
    kl = _kl(jnp.moveaxis(tc, 1, 2), student, free)  # [B, HKV, C]
    has_free = jnp.broadcast_to(jnp.any(free, axis=-1), kl.shape)
    return jnp.moveaxis(kl, 1, 2), jnp.moveaxis(has_free, 1, 2).astype(kl.dtype)

  kl, counted = _common.map_query_chunks(
      chunk_fn, (q, teacher, positions) + (() if doc_start is None else (doc_start,)), chunk)
  return kl.sum() / jnp.maximum(counted.sum(), 1)


def block_teacher(q, positions, k, *, doc_start=None, scale: float, config: NSAConfig,
                  chunk: int, backend: str, interpret: bool | None):
  """The teacher [B, R, HKV, Ts] of query rows q [B, R, HQ, Dk] at positions [1, R]
  (documents from doc_start [B, R] where given) over the keys k [B, T, HKV, Dk]: causal
  softmax attention averaged over each group's heads and summed per selection block,
  computed from each block's lse (`block_lse_xla` or the kernel). Carries no gradient;
  named as a kernel's output (`saved`), so that a layer's backward does not make it again."""
  q, k = lax.stop_gradient(q), lax.stop_gradient(k)
  block, Ts = config.select_block, config.num_select_blocks(k.shape[1])
  if backend == "pallas":
    lse = kernel.block_lse(q, k, positions[0], block=block, scale=scale,
                           interpret=_common.resolve_interpret(interpret), doc_start=doc_start)
    return _util.saved(_teacher_from_block_lse(lse, k.shape[2]))
  return _common.map_query_chunks(
      lambda _, qc, pos, *doc: _teacher_from_block_lse(
          block_lse_xla(qc, pos[0], k, scale, block, Ts, *doc), k.shape[2]),
      (q, positions) + (() if doc_start is None else (doc_start,)), chunk)


def block_lse_xla(qc, t, k, scale: float, block: int, num_blocks: int, doc_start=None):
  """[B, C, HQ, num_blocks]: per block of `block` keys, the lse of qc's [B, C, HQ, Dk]
  causal logits at positions t [C] over the keys of k [B, T, HKV, Dk] the query sees
  (in its document: doc_start [B, C]); -inf where it sees none."""
  B, C, HQ, Dk = qc.shape
  T, HKV = k.shape[1], k.shape[2]
  dt = _common.compute_dtype(qc.dtype)
  qg = qc.reshape(B, C, HKV, HQ // HKV, Dk)
  s = jnp.einsum("bchgd,bkhd->bchgk", qg, k, preferred_element_type=dt).astype(dt) * scale
  key = jnp.arange(T)
  seen = (key[None, :] <= t[:, None])[None]                               # [1, C, T]
  if doc_start is not None:
    seen = seen & (key[None, None, :] >= doc_start[:, :, None])
  s = jnp.where(seen[:, :, None, None], s, -jnp.inf).reshape(B, C, HQ, T)
  s = jnp.pad(s, [(0, 0)] * 3 + [(0, num_blocks * block - T)], constant_values=-jnp.inf)
  return jax.nn.logsumexp(s.reshape(B, C, HQ, num_blocks, block), axis=-1)   # -inf: none


def _teacher_from_block_lse(lse, num_kv_heads: int):
  """[B, R, HQ, Ts] per-block lse -> [B, R, HKV, Ts]: each head's softmax mass per block,
  averaged over the group's heads (0 where a head sees nothing)."""
  total = jax.nn.logsumexp(lse, axis=-1, keepdims=True)
  mass = jnp.where(lse == -jnp.inf, 0.0, jnp.exp(lse - total))
  B, R, HQ, Ts = lse.shape
  return mass.reshape(B, R, num_kv_heads, HQ // num_kv_heads, Ts).mean(axis=3)


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
