"""Dense causal attention: the full-attention model's (docs/api.md#the-model), the baseline NSA
is compared with.

Dense causal attention is the compressed branch's with one-token blocks (`TOKEN_BLOCKS`:
l = d = 1, block i is token i, visible to t iff i <= t), document mask included. Its
backends (`nsa_jax.ops.dispatch`): cuDNN's fused attention where it takes the call (no
segment ids), the compressed branch's Pallas kernel over `TOKEN_BLOCKS` on a GPU (its loops
skip other documents), else the reference: jax's XLA attention, or over packed rows the
compressed branch's chunked reference.
"""
from __future__ import annotations

import jax

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common, cudnn, dispatch, segments
from nsa_jax.ops.compressed import _compressed_attention

# select_block = 1: documents may start anywhere.
TOKEN_BLOCKS = NSAConfig(compress_block=1, compress_stride=1, select_block=1, num_selected=3)


def dense_attention(q, k, v, *, impl: str = "auto", interpret: bool | None = None,
                    segment_ids=None):
  """Causal GQA attention, scale 1/sqrt(Dk).

  Args:
    q: [B, T, HQ, Dk]; k, v: [B, T, HKV, Dk], [B, T, HKV, Dv].
    impl: "auto" (on a GPU cuDNN where `cudnn.cudnn_runs` and no segment ids, else the
      Pallas kernel where it takes the inputs, else the reference; the reference
      elsewhere), "cudnn", "pallas" or "xla" (`nsa_jax.ops.dispatch`).
    segment_ids: [B, T] int, documents packed in a row (docs/semantics.md#packed-rows;
      any start), or None: each query sees the keys of its own document only.

  Returns:
    o [B, T, HQ, Dv]. Gradients flow to q, k, v.
  """
  _common.check_attention_inputs(q, k, v)
  doc_start, doc_end = segments.documents(segment_ids, q, TOKEN_BLOCKS.select_block)
  backend = dispatch.choose("dense_attention", impl, dispatch.Call(
      dict(q=q, k=k, v=v), TOKEN_BLOCKS, interpret, segment_ids is not None))
  scale = _common.resolve_scale(None, q)
  if backend == "cudnn":
    return cudnn.cudnn_causal_attention(q, k, v, scale=scale)[0]
  if backend == "xla" and segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)
  return _compressed_attention(q, k, v, config=TOKEN_BLOCKS, scale=scale, backend=backend,
                               interpret=interpret, doc_start=doc_start, doc_end=doc_end)[0]
