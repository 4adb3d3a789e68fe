"""Compressed-token attention (paper §3.3.1, Eq. 7; SPEC §3 "Compressed attention").

Query t attends to compressed block i iff the block lies wholly in its past,
`i*d + l - 1 <= t`. Queries that see no block (t < l - 1) get a zero output
and lse = -inf. The Pallas kernel is `pallas_kernels/compressed_attention.py`.
"""
from __future__ import annotations

import jax.numpy as jnp

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common

QUERY_CHUNK = 512


def compressed_attention(q, k_cmp, v_cmp, *, config: NSAConfig,
                         scale: float | None = None, impl: str = "auto",
                         interpret: bool | None = None):
  """Attention of every query over the compressed keys/values.

  Args:
    q: [B, T, HQ, Dk] queries.
    k_cmp, v_cmp: [B, Tc, HKV, Dk], [B, Tc, HKV, Dv], Tc = config.num_compressed(T).
    config: block sizes.
    scale: softmax scale, default 1/sqrt(Dk).
    impl: "xla" (reference), "pallas" (kernels) or "auto" (pallas on GPU).
    interpret: run Pallas kernels in interpret mode (default: when not on GPU).

  Returns:
    (o [B, T, HQ, Dv], lse [B, T, HQ]): lse is the natural-log sum-exp in
    float32 (float64 for float64 inputs), -inf where no block is visible.
  """
  _common.check_config(config)
  _common.check_attention_inputs(q, k_cmp, v_cmp, names=("q", "k_cmp", "v_cmp"),
                                 seq_len=config.num_compressed(q.shape[1]))
  scale = _common.resolve_scale(scale, q)
  if _common.use_pallas(impl):
    from pallas_kernels import compressed_attention as kernel
    return kernel.compressed_attention(
        q, k_cmp, v_cmp, config=config, scale=scale,
        interpret=_common.resolve_interpret(interpret))
  return compressed_attention_xla(q, k_cmp, v_cmp, config=config, scale=scale)


def compressed_scores(qc, start, k_cmp, config: NSAConfig, scale: float):
  """Scaled scores and visibility mask of one query chunk against all blocks.

  qc: [B, C, HQ, Dk] queries at positions start .. start+C-1.
  Returns (s [B, HKV, G, C, Tc] in the compute dtype, mask [C, Tc]).
  """
  B, C, HQ, Dk = qc.shape
  Tc, HKV = k_cmp.shape[1], k_cmp.shape[2]
  dt = _common.compute_dtype(qc.dtype)
  qg = qc.reshape(B, C, HKV, HQ // HKV, Dk)
  s = jnp.einsum("bchgd,bkhd->bhgck", qg, k_cmp,
                 preferred_element_type=dt).astype(dt) * scale
  t = start + jnp.arange(C)
  block_end = jnp.arange(Tc) * config.compress_stride + config.compress_block - 1
  return s, block_end[None, :] <= t[:, None]


def compressed_attention_xla(q, k_cmp, v_cmp, *, config: NSAConfig, scale: float,
                             query_chunk: int = QUERY_CHUNK):
  """Pure-JAX reference, chunked over queries: memory O(chunk * Tc)."""
  B, T, HQ, _ = q.shape
  Tc, Dv = k_cmp.shape[1], v_cmp.shape[-1]
  dt = _common.compute_dtype(q.dtype)
  if Tc == 0:
    return (jnp.zeros((B, T, HQ, Dv), q.dtype),
            jnp.full((B, T, HQ), -jnp.inf, dt))

  def chunk_fn(start, qc):
    s, mask = compressed_scores(qc, start, k_cmp, config, scale)
    p, lse = _common.masked_softmax(s, mask)
    o = jnp.einsum("bhgck,bkhd->bchgd", p, v_cmp.astype(dt))
    C = qc.shape[1]
    return (o.reshape(B, C, HQ, Dv).astype(q.dtype),
            jnp.moveaxis(lse, 3, 1).reshape(B, C, HQ))

  return _common.map_query_chunks(chunk_fn, (q,), query_chunk)
