"""Compressed-token attention (paper §3.3.1, Eq. 7; docs/semantics.md#compressed-attention).

Query t attends to compressed block i iff `i*d + l - 1 <= t`; queries that see no block get
o = 0 and lse = -inf. The Pallas kernel is `pallas_kernels/compressed_attention.py`; on a
GPU `nsa` runs the branch on cuDNN, folded by stride residue (`compressed_attention_folded`,
docs/kernels.md#cudnn-paths), wherever cuDNN takes it (`nsa_jax.ops.dispatch`).
"""
from __future__ import annotations

import jax.numpy as jnp

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common, cudnn, dispatch, segments
from pallas_kernels import compressed_attention as kernel

QUERY_CHUNK = 512


def check_inputs(q, k_cmp, v_cmp, *, config: NSAConfig, q_offset=None,
                 names=("q", "k_cmp", "v_cmp")) -> None:
  """The compressed branch's checks (docs/api.md#errors): the config, and q, k_cmp, v_cmp with
  Tc = config.num_compressed(T) blocks, or k_cmp whole when q is a slice at a query offset."""
  _common.check_config(config)
  _common.check_attention_inputs(
      q, k_cmp, v_cmp, names=names,
      seq_len=k_cmp.shape[1] if q_offset is not None else config.num_compressed(q.shape[1]))


def compressed_attention(q, k_cmp, v_cmp, *, config: NSAConfig,
                         scale: float | None = None, impl: str = "auto",
                         interpret: bool | None = None, segment_ids=None, q_offset=None):
  """Attention of every query over the compressed keys/values.

  Args:
    q: [B, T, HQ, Dk] queries.
    k_cmp, v_cmp: [B, Tc, HKV, Dk], [B, Tc, HKV, Dv], Tc = config.num_compressed(T).
    config: block sizes.
    scale: softmax scale, default 1/sqrt(Dk).
    impl: "xla" (reference), "pallas" (kernel), "auto" (the kernel on a GPU
      where it takes the inputs, else the reference) or "cudnn"
      (`compressed_attention_folded` on cuDNN; its lse carries no gradient,
      which is all `nsa` needs of it: the selection is discrete).
    interpret: run Pallas kernels in interpret mode (default: when not on GPU).
    segment_ids: [B, T] int, documents packed in a row (docs/semantics.md#packed-rows): runs
      of equal ids starting at multiples of config.select_block (a ValueError
      otherwise, where the ids are concrete; under jit the caller's contract).
      None: one document per row. cuDNN takes none (`dispatch`).
    q_offset: private (context parallelism, `nsa_jax.context`): an int32 scalar, may be
      traced; q holds the queries at positions q_offset .. q_offset + T - 1 of a
      sequence whose compressed blocks k_cmp, v_cmp and segment_ids [B, S] are whole.
      cuDNN takes none.

  Returns:
    (o [B, T, HQ, Dv], lse [B, T, HQ]): lse is the natural-log sum-exp in
    float32 (float64 for float64 inputs), -inf where no block is visible.
  """
  check_inputs(q, k_cmp, v_cmp, config=config, q_offset=q_offset)
  sliced = q_offset is not None
  doc_start, doc_end = segments.documents(segment_ids, q, config.select_block, q_offset)
  backend = dispatch.choose("compressed_attention", impl, dispatch.Call(
      dict(q=q, k_cmp=k_cmp, v_cmp=v_cmp), config, interpret, segment_ids is not None,
      sliced))
  return _compressed_attention(q, k_cmp, v_cmp, config=config,
                               scale=_common.resolve_scale(scale, q), backend=backend,
                               interpret=interpret, doc_start=doc_start, doc_end=doc_end,
                               q_offset=q_offset)


def _compressed_attention(q, k_cmp, v_cmp, *, config: NSAConfig, scale: float, backend: str,
                          interpret: bool | None, doc_start=None, doc_end=None,
                          q_offset=None):
  """`compressed_attention` of checked inputs on `backend` (`dispatch.choose`'s), packed
  rows given by their bounds (`segments.bounds`); checks nothing (`nsa` checks once)."""
  if backend == "cudnn":
    return compressed_attention_folded(q, k_cmp, v_cmp, config=config, scale=scale)
  if backend == "pallas":
    return kernel.compressed_attention(
        q, k_cmp, v_cmp, block=config.compress_block, stride=config.compress_stride,
        scale=scale, interpret=_common.resolve_interpret(interpret), doc_start=doc_start,
        doc_end=doc_end, q_offset=q_offset)
  return compressed_attention_xla(q, k_cmp, v_cmp, config=config, scale=scale,
                                  doc_start=doc_start, first=0 if q_offset is None else q_offset)


def compressed_scores(qc, start, k_cmp, config: NSAConfig, scale: float, doc_start=None):
  """Scaled scores and visibility mask of one query chunk against all blocks.

  qc: [B, C, HQ, Dk] queries at positions start .. start+C-1.
  doc_start: [B, C] int, the first position of each query's document, or None.
  Returns (s [B, HKV, G, C, Tc] in the compute dtype, mask [C, Tc], or
  [B, 1, 1, C, Tc] with doc_start).
  """
  B, C, HQ, Dk = qc.shape
  Tc, HKV = k_cmp.shape[1], k_cmp.shape[2]
  dt = _common.compute_dtype(qc.dtype)
  qg = qc.reshape(B, C, HKV, HQ // HKV, Dk)
  s = jnp.einsum("bchgd,bkhd->bhgck", qg, k_cmp,
                 preferred_element_type=dt).astype(dt) * scale
  t = start + jnp.arange(C)
  block_start = jnp.arange(Tc) * config.compress_stride
  mask = block_start[None, :] + config.compress_block - 1 <= t[:, None]
  if doc_start is None:
    return s, mask
  inside = doc_start[:, :, None] <= block_start[None, None, :]             # [B, C, Tc]
  return s, (mask[None] & inside)[:, None, None]


def compressed_attention_xla(q, k_cmp, v_cmp, *, config: NSAConfig, scale: float,
                             query_chunk: int = QUERY_CHUNK, first: int = 0,
                             doc_start=None):
  """Pure-JAX reference, chunked over queries: memory O(chunk * Tc).

  first: position of q's first row, for a slice of the queries (all blocks given).
  doc_start: [B, T] int, the first position of each query's document (packed rows,
  `segments.document_starts`), or None.
  """
  B, T, HQ, _ = q.shape
  Tc, Dv = k_cmp.shape[1], v_cmp.shape[-1]
  dt = _common.compute_dtype(q.dtype)
  if Tc == 0:
    return (jnp.zeros((B, T, HQ, Dv), q.dtype),
            jnp.full((B, T, HQ), -jnp.inf, dt))

  def chunk_fn(start, qc, *doc_c):
    s, mask = compressed_scores(qc, start, k_cmp, config, scale, *doc_c)
    p, lse = _common.masked_softmax(s, mask)
    o = jnp.einsum("bhgck,bkhd->bchgd", p, v_cmp.astype(dt))
    C = qc.shape[1]
    return (o.reshape(B, C, HQ, Dv).astype(q.dtype),
            jnp.moveaxis(lse, 3, 1).reshape(B, C, HQ))

  xs = (q,) if doc_start is None else (q, doc_start)
  return _common.map_query_chunks(chunk_fn, xs, query_chunk, first, save=False)


def compressed_attention_folded(q, k_cmp, v_cmp, *, config: NSAConfig, scale: float):
  """The compressed branch as one causal dense attention per stride residue.

  Write t = d*j + r (d = compress_stride, 0 <= r < d). Block i is visible to t
  iff i*d + l - 1 <= t, i.e. iff i <= j - s_r with s_r = ceil((l - 1 - r) / d):
  S = l/d for r < d - 1 and S - 1 for r = d - 1 (d divides l). So the queries
  of one residue, placed at m = j - s_r, see exactly the blocks i <= m: the
  plain causal mask over M = ceil(T/d) positions, which cuDNN's fused
  attention runs at its dense rate (the d residues are d batch entries that
  share k_cmp). Queries with j < s_r see nothing (t < l - 1): o = 0, lse =
  -inf. Blocks at positions >= Tc are zero padding that only padding queries
  see. The moves are pads, slices and transposes (no gathers, whose
  transposes would be scatters); lse carries no gradient
  (`cudnn.cudnn_causal_attention`).
  """
  B, T, HQ, Dk = q.shape
  Tc, HKV, Dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
  dt = _common.compute_dtype(q.dtype)
  if Tc == 0:
    return (jnp.zeros((B, T, HQ, Dv), q.dtype), jnp.full((B, T, HQ), -jnp.inf, dt))
  d, S = config.compress_stride, config.compress_block // config.compress_stride
  M = -(-T // d)
  # Queries: token d*(m + s_r) + r goes to batch entry (b, r), position m.
  qj = jnp.pad(q, [(0, 0), (0, (M + S) * d - T), (0, 0), (0, 0)]).reshape(B, M + S, d, HQ, Dk)
  qf = jnp.concatenate([qj[:, S:S + M, :d - 1], qj[:, S - 1:S - 1 + M, d - 1:]], axis=2)
  qf = jnp.moveaxis(qf, 2, 1).reshape(B * d, M, HQ, Dk)

  def fold(x):   # [B, Tc, HKV, D] -> [B*d, M, HKV, D]; its gradient sums the d copies in f32
    x = jnp.pad(x.astype(dt), [(0, 0), (0, M - Tc), (0, 0), (0, 0)])
    return jnp.broadcast_to(x[:, None], (B, d) + x.shape[1:]).reshape(
        B * d, M, HKV, x.shape[-1]).astype(q.dtype)

  o, lse = cudnn.cudnn_causal_attention(qf, fold(k_cmp), fold(v_cmp), scale=scale)

  def unfold(x, empty):   # [B*d, M, ...] -> [B, T, ...], rows j < s_r filled with `empty`
    x = jnp.moveaxis(x.reshape(B, d, M, *x.shape[2:]), 1, 2)
    rows = lambda lo, hi: [(0, 0), (lo, hi)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.concatenate([jnp.pad(x[:, :, :d - 1], rows(S, 0), constant_values=empty),
                         jnp.pad(x[:, :, d - 1:], rows(S - 1, 1), constant_values=empty)],
                        axis=2)
    return x.reshape(B, (M + S) * d, *x.shape[3:])[:, :T]

  return unfold(o, 0), unfold(lse, -jnp.inf)
