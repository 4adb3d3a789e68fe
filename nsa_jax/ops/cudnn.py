"""Every cuDNN call of the project: cuDNN's fused causal attention, where it runs, how it is split.

`cudnn_causal_attention` is the one call of `jax.nn.dot_product_attention(implementation=
"cudnn")`: the window branch, the compressed branch folded by stride residue and the model's
dense baseline use it. `cudnn_runs` is the rule of where it runs, which `nsa_jax.ops.dispatch`
applies. No tensor of one call may reach `MAX_ELEMENTS` (2^31) elements, past which cuDNN
returned wrong gradients (experiments/PERF_NOTES.md, "Measurements behind the code's
defaults"): `call_plan` splits larger calls by batch rows, then by KV groups
(docs/kernels.md#cudnn-paths).
"""
from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
from jax import lax

from nsa_jax.ops import _common

# Limit on the elements of every tensor of one cuDNN call (module doc). A module
# constant so that a test can lower it to exercise the split on small shapes.
MAX_ELEMENTS = 2 ** 31


class CallPlan(typing.NamedTuple):
  """Batch rows and KV groups (KV heads, each with its G query heads) per cuDNN call."""
  rows: int
  groups: int


def call_plan(B: int, T: int, HQ: int, HKV: int, D: int) -> CallPlan | None:
  """How cuDNN takes a causal attention over q [B, T, HQ, D] and k, v [B, T, HKV, D]
  (the shapes of the call itself: T even, v padded to D) without any tensor reaching
  `MAX_ELEMENTS`: whole, in chunks of rows, or, when one row is too large, one row
  at a time in chunks of KV groups. None when one group of one row is too large.
  The last chunk may be smaller than the others.
  """
  most = lambda elements: (MAX_ELEMENTS - 1) // elements   # parts of `elements` that fit
  rows = most(T * HQ * D)
  if rows >= 1:
    return CallPlan(rows=min(rows, B), groups=HKV)
  groups = most(T * (HQ // HKV) * D)
  if groups >= 1:
    return CallPlan(rows=1, groups=min(groups, HKV))
  return None


def _call_shapes(q, v):
  """(B, T, HQ, HKV, D) of the cuDNN call over q and v: T padded to even, v to D."""
  B, T, HQ, D = q.shape
  return B, T + T % 2, HQ, v.shape[2], D


def cudnn_takes(dtype) -> bool:
  """Whether cuDNN's fused attention runs on this backend for this dtype:
  a GPU and 16-bit inputs."""
  return (jax.default_backend() == "gpu"
          and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))


def cudnn_runs(q, v, interpret: bool | None = None) -> bool:
  """Whether cuDNN's fused attention runs a causal attention over q [B, T, HQ, Dk]
  and v [B, T, HKV, Dv] (arrays or `jax.ShapeDtypeStruct`s): a GPU, 16-bit inputs,
  no interpret mode asked for, Dk a multiple of 8 up to 128 (256 from Hopper on),
  Dv <= Dk (v is zero-padded to Dk), and one KV group of one batch row small
  enough for `call_plan` (module doc).

  Where it runs, `nsa(impl="auto" | "pallas")` gives it the window and the
  compressed branches (`nsa_jax.ops.dispatch`): it is faster than the Pallas
  kernels there (experiments/PERF_NOTES.md).
  """
  if _common.resolve_interpret(interpret) or not cudnn_takes(q.dtype):
    return False
  Dk, Dv = q.shape[-1], v.shape[-1]
  hopper = float(getattr(jax.devices()[0], "compute_capability", "0")) >= 9.0
  return (Dk % 8 == 0 and Dv <= Dk <= (256 if hopper else 128)
          and call_plan(*_call_shapes(q, v)) is not None)


def _part(x, axis: int, start: int, size: int):
  """x[start : start + size] along `axis`; x itself when that is all of it."""
  return x if size == x.shape[axis] else lax.slice_in_dim(x, start, start + size, axis=axis)


def cudnn_causal_attention(q, k, v, *, scale: float, window: int | None = None):
  """cuDNN's fused causal attention (q and k of the same length), optionally
  banded to the last `window` keys; returns (o, lse [B, T, HQ] in the compute dtype).

  Its training path takes only even sequence lengths and Dk == Dv: an odd T
  gets one zero token appended, which no real query sees (causal mask), and
  v with Dv < Dk zero columns; both are sliced off the output. Calls too large
  for cuDNN are split by `call_plan` (module doc); gradients flow through the
  slices. The lse carries no gradient: jax's cuDNN rule drops its cotangent,
  so it is cut here explicitly.
  """
  B, T, HQ, Dk = q.shape
  HKV, Dv = k.shape[2], v.shape[-1]
  plan = call_plan(*_call_shapes(q, v))
  if plan is None:
    raise ValueError(f"cuDNN cannot take one KV group of one row: T={T}, G={HQ // HKV}, "
                     f"Dk={Dk} reach 2^31 elements (check cudnn_runs first)")
  pad = [(0, 0), (0, T % 2), (0, 0), (0, 0)]
  q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad[:3] + [(0, Dk - Dv)])
  G = HQ // HKV

  def call(b0: int, g0: int):
    rows, groups = min(plan.rows, B - b0), min(plan.groups, HKV - g0)
    rows_of = lambda x: _part(x, 0, b0, rows)
    return jax.nn.dot_product_attention(
        _part(rows_of(q), 2, g0 * G, groups * G),
        _part(rows_of(k), 2, g0, groups), _part(rows_of(v), 2, g0, groups),
        scale=scale, is_causal=True, implementation="cudnn",
        local_window_size=None if window is None else (window - 1, 0),
        return_residual=True)

  concat = lambda parts, axis: jax.tree.map(lambda *x: jnp.concatenate(x, axis), *parts)
  o, lse = concat([concat([call(b0, g0) for g0 in range(0, HKV, plan.groups)], 2)
                   for b0 in range(0, B, plan.rows)], 0)
  return (o[:, :T, :, :Dv],
          lax.stop_gradient(lse[:, :T].astype(_common.compute_dtype(q.dtype))))
