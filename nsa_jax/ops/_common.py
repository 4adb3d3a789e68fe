"""Pieces shared by the NSA ops: input checks, impl dispatch, chunking, softmax.

Every public op validates its inputs here *before* tracing any kernel, so a
bad call fails with a `ValueError` that names the argument and its values.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from nsa_jax.config import NSAConfig

IMPLS = ("auto", "xla", "pallas")


def check_config(config) -> None:
  if not isinstance(config, NSAConfig):
    raise ValueError(f"config must be an NSAConfig, got {type(config).__name__}")


def check_rank4(name: str, x) -> None:
  if getattr(x, "ndim", None) != 4:
    raise ValueError(
        f"{name} must have shape [batch, time, heads, dim], got shape "
        f"{getattr(x, 'shape', None)}")


def check_float(name: str, x, dtype) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}.dtype={x.dtype} must be floating point")
  if x.dtype != dtype:
    raise ValueError(f"{name}.dtype={x.dtype} must match q.dtype={dtype}")


def check_attention_inputs(q, k, v, *, names=("q", "k", "v"),
                           seq_len: int | None = None) -> None:
  """Checks q [B,T,HQ,Dk], k [B,S,HKV,Dk], v [B,S,HKV,Dv] (S = T by default)."""
  for name, x in zip(names, (q, k, v)):
    check_rank4(name, x)
  qn, kn, vn = names
  check_float(qn, q, q.dtype)
  check_float(kn, k, q.dtype)
  check_float(vn, v, q.dtype)
  B, T, HQ, Dk = q.shape
  if T < 1:
    raise ValueError(f"{qn} must hold at least one token, got T={T}")
  if k.shape[0] != B or v.shape[0] != B:
    raise ValueError(f"batch sizes differ: {qn}.shape={q.shape}, "
                     f"{kn}.shape={k.shape}, {vn}.shape={v.shape}")
  S = T if seq_len is None else seq_len
  if k.shape[1] != S or v.shape[1] != S:
    raise ValueError(f"{kn} and {vn} must have {S} time steps, got "
                     f"{kn}.shape={k.shape}, {vn}.shape={v.shape}")
  if k.shape[2] != v.shape[2]:
    raise ValueError(f"{kn} and {vn} head counts differ: {kn}.shape={k.shape}, "
                     f"{vn}.shape={v.shape}")
  HKV = k.shape[2]
  if HKV < 1 or HQ % HKV:
    raise ValueError(f"query heads HQ={HQ} ({qn}) must be a multiple of "
                     f"KV heads HKV={HKV} ({kn})")
  if k.shape[3] != Dk:
    raise ValueError(f"{kn}.shape[-1]={k.shape[3]} must equal "
                     f"{qn}.shape[-1]={Dk}")


def check_block_idx(block_idx, q, k, config: NSAConfig) -> None:
  check_rank4("block_idx", block_idx)
  B, T, _, _ = q.shape
  want = (B, T, k.shape[2], config.num_selected)
  if block_idx.shape != want:
    raise ValueError(f"block_idx.shape={block_idx.shape} must be "
                     f"[B, T, HKV, num_selected]={want}")
  if not jnp.issubdtype(block_idx.dtype, jnp.integer):
    raise ValueError(f"block_idx.dtype={block_idx.dtype} must be an integer type")


def check_impl(impl: str, allowed: tuple[str, ...] = IMPLS) -> None:
  if impl not in allowed:
    raise ValueError(f"impl={impl!r} must be one of {allowed}")


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
  compressed branches (`cudnn_branch_impl`): it is faster than the Pallas
  kernels there (see `window` and `compressed` for the measured times).
  """
  if resolve_interpret(interpret) or not cudnn_takes(q.dtype):
    return False
  Dk, Dv = q.shape[-1], v.shape[-1]
  hopper = float(getattr(jax.devices()[0], "compute_capability", "0")) >= 9.0
  return Dk % 8 == 0 and Dv <= Dk <= (256 if hopper else 128)


def check_cudnn_runs(q, v, interpret: bool | None) -> None:
  if not cudnn_runs(q, v, interpret):
    raise ValueError(
        f"impl='cudnn' needs a GPU backend (have {jax.default_backend()}), "
        f"16-bit inputs (q.dtype={q.dtype}), Dv <= Dk <= 128 or 256 on Hopper, "
        f"Dk a multiple of 8 (Dk={q.shape[-1]}, Dv={v.shape[-1]}) and "
        f"interpret={interpret} not True")


def cudnn_branch_impl(impl: str, q, v, interpret: bool | None = None) -> str:
  """The impl a cuDNN-capable branch of `nsa(impl=impl)` runs: "cudnn" wherever
  `cudnn_runs`, unless the reference ("xla") is asked for; `impl` otherwise."""
  return "cudnn" if impl != "xla" and cudnn_runs(q, v, interpret) else impl


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


def use_pallas(impl: str) -> bool:
  """`auto` means the Pallas kernels on a GPU, the XLA reference elsewhere."""
  check_impl(impl)
  if impl == "auto":
    return jax.default_backend() == "gpu"
  return impl == "pallas"


def resolve_interpret(interpret: bool | None) -> bool:
  """Pallas kernels run in interpret mode unless a GPU is the default backend."""
  if interpret is None:
    return jax.default_backend() != "gpu"
  return bool(interpret)


def resolve_scale(scale: float | None, q) -> float:
  return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def compute_dtype(dtype):
  """Softmax and accumulation dtype: float32, or float64 when inputs are."""
  return jnp.promote_types(dtype, jnp.float32)


def masked_softmax(s, mask):
  """Softmax over the last axis restricted to `mask`; NaN-free when nothing is visible.

  Returns (p, lse): rows without a visible entry get p = 0 and lse = -inf, and
  their gradients are zero, not NaN.
  """
  big_neg = jnp.finfo(s.dtype).min
  m = lax.stop_gradient(jnp.max(jnp.where(mask, s, big_neg), axis=-1, keepdims=True))
  e = jnp.where(mask, jnp.exp(jnp.where(mask, s, m) - m), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  seen = denom > 0
  p = e / jnp.where(seen, denom, 1.0)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)
  return p, lse[..., 0]


def map_query_chunks(fn: Callable, xs: Sequence[jax.Array], chunk: int):
  """Applies `fn(start, *x_chunks)` to query chunks along axis 1 with `lax.map`.

  Each x in `xs` is [B, T, ...]; T is padded up to a multiple of `chunk` (the
  padded rows are computed and dropped). `start` is the chunk's first query
  position. `fn` returns a pytree of [B, chunk, ...] arrays; the result is
  the same pytree with [B, T, ...] arrays. Keeps live memory at one chunk's
  worth of scores instead of all T queries' worth, in the backward pass too:
  each chunk is rematerialised (`jax.checkpoint`) rather than saved.
  """
  T = xs[0].shape[1]
  chunk = min(chunk, T)
  n = -(-T // chunk)
  pad = n * chunk - T

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], n, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  def merge(y):
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], n * chunk, *y.shape[3:])[:, :T]

  starts = jnp.arange(n, dtype=jnp.int32) * chunk
  body = jax.checkpoint(lambda a: fn(a[0], *a[1:]))
  out = lax.map(body, (starts, *map(split, xs)))
  return jax.tree.map(merge, out)
