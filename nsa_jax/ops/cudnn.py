"""Every call of jax's cuDNN fused attention (the window and compressed branches on a GPU)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from nsa_jax.ops._common import compute_dtype, resolve_interpret


def cudnn_takes(dtype) -> bool:
  """Whether cuDNN's fused attention runs on this backend for this dtype:
  a GPU and 16-bit inputs."""
  return (jax.default_backend() == "gpu"
          and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))


def cudnn_runs(q, v, interpret: bool | None = None) -> bool:
  """Whether cuDNN's fused attention runs a branch over q and v: a GPU, 16-bit
  inputs, no interpret mode asked for, Dk a multiple of 8 up to 128 (256 from
  Hopper on) and Dv <= Dk (v is zero-padded to Dk).

  Where it runs, `nsa(impl="auto" | "pallas")` gives it the window and the
  compressed branches (`nsa_jax.ops.dispatch`): it is faster than the Pallas
  kernels there (experiments/PERF_NOTES.md).
  """
  if resolve_interpret(interpret) or not cudnn_takes(q.dtype):
    return False
  Dk, Dv = q.shape[-1], v.shape[-1]
  hopper = float(getattr(jax.devices()[0], "compute_capability", "0")) >= 9.0
  return Dk % 8 == 0 and Dv <= Dk <= (256 if hopper else 128)


def cudnn_causal_attention(q, k, v, *, scale: float, window: int | None = None):
  """cuDNN's fused causal attention (q and k of the same length), optionally
  banded to the last `window` keys; returns (o, lse [B, T, HQ] in the compute dtype).

  Its training path takes only even sequence lengths and Dk == Dv: an odd T
  gets one zero token appended, which no real query sees (causal mask), and
  v with Dv < Dk zero columns; both are sliced off the output. The lse
  carries no gradient: jax's cuDNN rule drops its cotangent, so it is cut
  here explicitly.
  """
  T, Dk, Dv = q.shape[1], q.shape[-1], v.shape[-1]
  pad = [(0, 0), (0, T % 2), (0, 0), (0, 0)]
  o, lse = jax.nn.dot_product_attention(
      jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad[:3] + [(0, Dk - Dv)]),
      scale=scale, is_causal=True, implementation="cudnn",
      local_window_size=None if window is None else (window - 1, 0),
      return_residual=True)
  return o[:, :T, :, :Dv], lax.stop_gradient(lse[:, :T].astype(compute_dtype(q.dtype)))
