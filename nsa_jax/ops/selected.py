"""Selected-block attention (paper §3.3.2 and §3.4; docs/semantics.md#selected-attention).

Query head h of KV group g attends to the tokens of the blocks in
`block_idx[b, t, g]`, causally masked (`key position <= t`); `-1` slots are
empty. Packed rows (docs/semantics.md#packed-rows): only keys >= s(t); documents start
at multiples of l', so a block lies wholly inside or before it, and emptying the
slots of blocks before it (`document_blocks`) is the whole mask. The Pallas
kernel is `pallas_kernels/selected_attention/`. An optional per-slot bias is added
to the scores of the slot's keys (the straight-through gate,
docs/selection_learning.md#straight-through-gate).
"""
from __future__ import annotations

import jax.numpy as jnp

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common, dispatch, segments
from pallas_kernels import selected_attention as kernel

QUERY_CHUNK = 128


def selected_attention(q, k, v, block_idx, *, config: NSAConfig,
                       scale: float | None = None, impl: str = "auto",
                       interpret: bool | None = None, segment_ids=None, q_offset=None,
                       block_bias=None):
  """Attention of each query over the tokens of its selected blocks.

  Args:
    q: [B, T, HQ, Dk]; k, v: [B, T, HKV, Dk], [B, T, HKV, Dv].
    block_idx: [B, T, HKV, n] int, distinct block indices or -1.
    impl: "xla" (reference), "pallas" (kernels) or "auto" (the kernels on a GPU
      where they take the inputs, else the reference; `nsa_jax.ops.dispatch`).
    segment_ids: [B, T] int, packed documents (docs/semantics.md#packed-rows; see
      `compressed_attention`), or None.
    q_offset: private (context parallelism, `nsa_jax.context`): an int32 scalar, may be
      traced; q and block_idx hold the queries at positions q_offset .. q_offset + T - 1
      of a sequence whose keys k, v [B, S, ...] and segment_ids [B, S] are whole.
    block_bias: optional [B, T, HKV, n] float, added to the scores of the keys of
      each slot's block (the gate of `nsa`: `selection.selected_scores`); it gets a gradient.

  Returns:
    o [B, T, HQ, Dv]. Gradients flow to q, k, v (and block_bias).
  """
  _common.check_config(config)
  sliced = q_offset is not None
  _common.check_attention_inputs(q, k, v, seq_len=k.shape[1] if sliced else None)
  _common.check_block_idx(block_idx, q, k, config)
  if block_bias is not None and block_bias.shape != block_idx.shape:
    raise ValueError(f"block_bias.shape={block_bias.shape} must be block_idx.shape="
                     f"{block_idx.shape}")
  doc_start, _ = segments.documents(segment_ids, q, config.select_block, q_offset)
  bias = {} if block_bias is None else dict(block_bias=block_bias)
  backend = dispatch.choose("selected_attention", impl, dispatch.Call(
      dict(q=q, k=k, v=v, **bias), config, interpret, segment_ids is not None, sliced))
  return _selected_attention(q, k, v, block_idx, config=config,
                             scale=_common.resolve_scale(scale, q), backend=backend,
                             interpret=interpret, doc_start=doc_start, q_offset=q_offset,
                             block_bias=block_bias)


def _selected_attention(q, k, v, block_idx, *, config: NSAConfig, scale: float, backend: str,
                        interpret: bool | None, doc_start=None, q_offset=None,
                        block_bias=None):
  """`selected_attention` of checked inputs on `backend` (`dispatch.choose`'s), packed rows
  given by s(t) (`segments.bounds`); checks nothing (`nsa` checks once)."""
  block_idx = block_idx.astype(jnp.int32)
  if doc_start is not None:
    block_idx = document_blocks(block_idx, doc_start, config)
  if backend == "pallas":
    return kernel.selected_attention(
        q, k, v, block_idx, block=config.select_block, scale=scale,
        interpret=_common.resolve_interpret(interpret), q_offset=q_offset,
        block_bias=block_bias)
  return selected_attention_xla(q, k, v, block_idx, config=config, scale=scale,
                                first=0 if q_offset is None else q_offset,
                                block_bias=block_bias)


def document_blocks(block_idx, doc_start, config: NSAConfig):
  """block_idx [B, T, HKV, n] with the slots of blocks before each query's document
  emptied (-1): j*l' < s(t), doc_start [B, T] = s(t)."""
  return jnp.where(block_idx * config.select_block >= doc_start[:, :, None, None],
                   block_idx, -1)


def selected_attention_xla(q, k, v, block_idx, *, config: NSAConfig, scale: float,
                           query_chunk: int = QUERY_CHUNK, first: int = 0,
                           block_bias=None):
  """Pure-JAX reference: gathers the n*l' selected keys of each query chunk.

  first: position of q's (and block_idx's) first row, for a slice of the
  queries (all keys given). block_bias: optional [B, T, HKV, n], added to the
  scores of each slot's l' keys.
  """
  B, _, HQ, Dk = q.shape
  T, HKV, Dv = k.shape[1], k.shape[2], v.shape[-1]
  G, lp = HQ // HKV, config.select_block
  dt = _common.compute_dtype(q.dtype)
  kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)   # [B, HKV, T, D]

  def chunk_fn(start, qc, bc, *bias_c):
    C = qc.shape[1]
    t = start + jnp.arange(C)
    pos = bc[..., None] * lp + jnp.arange(lp)[None, None, None, None]                # [B, C, HKV, n, l']
    visible = (bc[..., None] >= 0) & (pos <= t[None, :, None, None, None])
    pos = jnp.swapaxes(jnp.clip(pos, 0, T - 1), 1, 2).reshape(B, HKV, -1, 1)
    kg = jnp.take_along_axis(kt, pos, axis=2).reshape(B, HKV, C, -1, Dk)
    vg = jnp.take_along_axis(vt, pos, axis=2).reshape(B, HKV, C, -1, Dv)
    qg = qc.reshape(B, C, HKV, G, Dk)
    s = jnp.einsum("bchgd,bhckd->bhgck", qg, kg,
                   preferred_element_type=dt).astype(dt) * scale
    mask = jnp.swapaxes(visible, 1, 2).reshape(B, HKV, 1, C, -1)
    if bias_c:   # [B, C, HKV, n] -> each slot's keys: [B, HKV, 1, C, n*l']
      bias = jnp.repeat(jnp.swapaxes(bias_c[0], 1, 2), lp, axis=-1)[:, :, None]
      s = s + bias.astype(dt)
    p, _ = _common.masked_softmax(s, mask)
    o = jnp.einsum("bhgck,bhckd->bchgd", p, vg.astype(dt))
    return o.reshape(B, C, HQ, Dv).astype(q.dtype)

  xs = (q, block_idx) + (() if block_bias is None else (block_bias,))
  return _common.map_query_chunks(chunk_fn, xs, query_chunk, first)
