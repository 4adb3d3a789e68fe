"""Block scores of the selection inside a kernel (NSA paper §3.3.2, Eq. 8-11; SPEC §3):
the sizes they need, the overlap weights of Eq. 9, and a float32-accurate dot.

Shared by the training-time selection kernel (`select_blocks.py`) and the decode kernel
(`decode_attention.py`).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class Selection:
  """The block sizes of the selection, as the kernels take them (the op-level
  `nsa_jax.NSAConfig` validates them; names as there).

  compress_block l and compress_stride d place compressed block i on tokens
  [i*d, i*d + l); select_block l' is a selection block's length; num_selected n blocks
  are kept per query, num_initial leading and num_local most recent ones forced in.
  group_score: a KV group's block score is the sum over its heads of each head's
  block score (Eq. 10, "sum") or their max ("max").
  """

  compress_block: int
  compress_stride: int
  select_block: int
  num_selected: int
  num_initial: int
  num_local: int
  group_score: str = "sum"

  @property
  def strides_per_block(self) -> int:
    """l / d: strides covered by one compressed block."""
    return self.compress_block // self.compress_stride

  @property
  def strides_per_select(self) -> int:
    """l' / d: strides covered by one selection block."""
    return self.select_block // self.compress_stride

  def num_select_blocks(self, seq_len: int) -> int:
    """Selection blocks covering `seq_len` tokens (the last may be partial)."""
    return -(-seq_len // self.select_block)

  def num_visible(self, t):
    """Compressed blocks visible to the query at position t (traced): i*d + l - 1 <= t."""
    return jnp.maximum((t + 1 - self.compress_block) // self.compress_stride + 1, 0)


def overlap_matrix(i0, rows: int, j0, cols: int, num_cols: int, sizes: Selection, dtype):
  """[rows, cols] overlap in strides of compressed blocks i0.. with selection blocks j0..
  (the weights of Eq. 9, small integers).

  Compressed block i covers strides [i, i + l/d), selection block j covers
  [j*l'/d, (j+1)*l'/d). Columns >= num_cols are zero.
  """
  per_block, per_select = sizes.strides_per_block, sizes.strides_per_select
  i = i0 + jnp.arange(rows, dtype=jnp.int32)[:, None]
  col = jnp.arange(cols, dtype=jnp.int32)[None, :]
  j = j0 + col
  overlap = (jnp.minimum(i + per_block, (j + 1) * per_select)
             - jnp.maximum(i, j * per_select))
  return jnp.where(col < num_cols, jnp.maximum(overlap, 0), 0).astype(dtype)


def exact_dot(p, weights):
  """p @ weights at float32 accuracy on bf16 tensor cores (float64: one f64 dot).

  The overlap weights are small integers, exact in bf16; p is split into three
  bf16 pieces (8 + 8 + 8 bits of mantissa), each multiplied exactly and summed
  in float32. An IEEE float32 dot would run on the FMA units in Triton and
  hold whole rows of p per thread (register spills).
  """
  if p.dtype == jnp.float64:
    return plgpu.dot(p, weights, allow_tf32=False)
  w = weights.astype(jnp.bfloat16)
  total = jnp.zeros((p.shape[0], w.shape[1]), jnp.float32)
  for _ in range(3):
    piece = p.astype(jnp.bfloat16)
    total += plgpu.dot(piece, w)
    p = p - piece.astype(jnp.float32)
  return total
