"""Sliding-window attention (paper §3.3.3; docs/semantics.md#sliding-window).

Query t attends to keys max(0, t-w+1) .. t: w keys, itself included; packed rows
(docs/semantics.md#packed-rows): none before s(t), the first token of t's document. The
Pallas kernel is `pallas_kernels/window_attention.py`; on a GPU, cuDNN's fused
sliding-window attention runs the branch where it takes the inputs, being the
faster of the two (`nsa_jax.ops.dispatch`; measured: experiments/PERF_NOTES.md).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common, cudnn, dispatch, segments
from pallas_kernels import window_attention as kernel

QUERY_CHUNK = 256


def window_attention(q, k, v, *, config: NSAConfig, scale: float | None = None,
                     impl: str = "auto", interpret: bool | None = None, segment_ids=None):
  """Causal attention over the last `config.window` keys of each query.

  Args:
    q: [B, T, HQ, Dk]; k, v: [B, T, HKV, Dk], [B, T, HKV, Dv].
    impl: "xla" (reference), "pallas" (kernel), "cudnn" (cuDNN's fused
      attention) or "auto": on a GPU cuDNN where it takes the inputs, else the
      Pallas kernel where it does, else the reference; the reference elsewhere
      (`nsa_jax.ops.dispatch`).
    segment_ids: [B, T] int, packed documents (docs/semantics.md#packed-rows; see
      `compressed_attention`), or None. cuDNN takes none (`dispatch`).

  Returns:
    o [B, T, HQ, Dv]. Gradients flow to q, k, v.
  """
  _common.check_config(config)
  _common.check_attention_inputs(q, k, v)
  doc_start, doc_end = segments.documents(segment_ids, q, config.select_block)
  backend = dispatch.choose("window_attention", impl, dispatch.Call(
      dict(q=q, k=k, v=v), config, interpret, segment_ids is not None))
  return _window_attention(q, k, v, config=config, scale=_common.resolve_scale(scale, q),
                           backend=backend, interpret=interpret, doc_start=doc_start,
                           doc_end=doc_end)


def _window_attention(q, k, v, *, config: NSAConfig, scale: float, backend: str,
                      interpret: bool | None, doc_start=None, doc_end=None):
  """`window_attention` of checked inputs on `backend` (`dispatch.choose`'s), packed rows
  given by their bounds (`segments.bounds`); checks nothing (`nsa` checks once)."""
  if backend == "cudnn":
    return cudnn.cudnn_causal_attention(q, k, v, scale=scale, window=config.window)[0]
  if backend == "pallas":
    return kernel.window_attention(q, k, v, window=config.window, scale=scale,
                                   interpret=_common.resolve_interpret(interpret),
                                   doc_start=doc_start, doc_end=doc_end)
  return window_attention_xla(q, k, v, config=config, scale=scale, doc_start=doc_start)


def window_attention_xla(q, k, v, *, config: NSAConfig, scale: float,
                         query_chunk: int = QUERY_CHUNK, first: int = 0, doc_start=None):
  """Pure-JAX reference: each query chunk reads a key slab of chunk + w - 1 keys.

  Work and memory grow with T * (chunk + w), never with T^2. first: position
  of q's first row, for a slice of the queries (all keys given). doc_start:
  [B, T] int, the first position of each query's document (packed rows), or None.
  """
  B, T, HQ, Dk = q.shape
  S, HKV, Dv = k.shape[1], k.shape[2], v.shape[-1]
  G, w = HQ // HKV, config.window
  C = min(query_chunk, T)
  span = C + w - 1
  dt = _common.compute_dtype(q.dtype)
  pad = [(0, 0), (w - 1, max(0, first + -(-T // C) * C - S)), (0, 0), (0, 0)]
  kp, vp = jnp.pad(k, pad), jnp.pad(v, pad)   # key j sits at row j + w - 1

  def chunk_fn(start, qc, *doc_c):
    ks = lax.dynamic_slice_in_dim(kp, start, span, axis=1)   # keys start-w+1 ..
    vs = lax.dynamic_slice_in_dim(vp, start, span, axis=1)
    t = start + jnp.arange(C)
    pos = start - (w - 1) + jnp.arange(span)
    mask = (pos[None, :] >= 0) & (pos[None, :] <= t[:, None]) & (
        pos[None, :] > t[:, None] - w)
    if doc_c:   # [B, 1, 1, C, span]: no key before the query's document
      mask = (mask[None] & (pos[None, None, :] >= doc_c[0][:, :, None]))[:, None, None]
    qg = qc.reshape(B, C, HKV, G, Dk)
    s = jnp.einsum("bchgd,bkhd->bhgck", qg, ks,
                   preferred_element_type=dt).astype(dt) * scale
    p, _ = _common.masked_softmax(s, mask)
    o = jnp.einsum("bhgck,bkhd->bchgd", p, vs.astype(dt))
    return o.reshape(B, C, HQ, Dv).astype(q.dtype)

  xs = (q,) if doc_start is None else (q, doc_start)
  return _common.map_query_chunks(chunk_fn, xs, C, first, save=False)
