"""Sliding-window attention (paper §3.3.3; SPEC §3 "Sliding window").

Query t attends to keys max(0, t-w+1) .. t: w keys, itself included. The
Pallas kernel is `pallas_kernels/window_attention.py`; on a GPU, cuDNN's fused
sliding-window attention runs the branch where it takes the inputs, being the
faster of the two (`cudnn_runs`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common

QUERY_CHUNK = 256
IMPLS = _common.IMPLS + ("cudnn",)


def cudnn_runs(q, v, interpret: bool | None = None) -> bool:
  """Whether cuDNN runs this window attention: a GPU, 16-bit inputs, no
  interpret mode asked for, Dk a multiple of 8 up to 128 (256 from Hopper on)
  and Dv <= Dk (v is zero-padded to Dk).

  Where it runs, cuDNN is faster than the Pallas kernel (H200, Config A,
  T = 64k: forward 3.21 vs 4.47 ms, forward+backward 14.3 vs 20.8 ms; 8k:
  0.65 vs 0.73 and 2.17 vs 2.93 ms; experiments/results/check_flash_window_cudnn_h200.json;
  Config B, Dk = 192 with v padded: 5.49 vs 7.30 and 26.3 vs 38.2 ms at 64k,
  experiments/results/history/dk_race_h200.log), so `impl="auto"` here and
  the window branch of `nsa(impl="auto" | "pallas")` take it.
  """
  if _common.resolve_interpret(interpret) or not _common.cudnn_takes(q.dtype):
    return False
  Dk, Dv = q.shape[-1], v.shape[-1]
  hopper = float(getattr(jax.devices()[0], "compute_capability", "0")) >= 9.0
  return Dk % 8 == 0 and Dv <= Dk <= (256 if hopper else 128)


def branch_impl(impl: str, q, v, interpret: bool | None = None) -> str:
  """The impl the window branch of `nsa(impl=impl)` runs: "cudnn" wherever
  `cudnn_runs`, unless the reference ("xla") is asked for; `impl` otherwise."""
  return "cudnn" if impl != "xla" and cudnn_runs(q, v, interpret) else impl


def window_attention(q, k, v, *, config: NSAConfig, scale: float | None = None,
                     impl: str = "auto", interpret: bool | None = None):
  """Causal attention over the last `config.window` keys of each query.

  Args:
    q: [B, T, HQ, Dk]; k, v: [B, T, HKV, Dk], [B, T, HKV, Dv].
    impl: "xla" (reference), "pallas" (kernel), "cudnn" (cuDNN's fused
      attention, see `cudnn_runs`) or "auto": cuDNN where it runs the inputs,
      else the Pallas kernel on a GPU and the reference elsewhere.

  Returns:
    o [B, T, HQ, Dv]. Gradients flow to q, k, v.
  """
  _common.check_config(config)
  _common.check_attention_inputs(q, k, v)
  _common.check_impl(impl, IMPLS)
  scale = _common.resolve_scale(scale, q)
  if impl == "cudnn" and not cudnn_runs(q, v, interpret):
    raise ValueError(
        f"impl='cudnn' needs a GPU backend (have {jax.default_backend()}), "
        f"16-bit inputs (q.dtype={q.dtype}), Dv <= Dk <= 128 or 256 on Hopper, "
        f"Dk a multiple of 8 (Dk={q.shape[-1]}, Dv={v.shape[-1]}) and "
        f"interpret={interpret} not True")
  if impl == "cudnn" or (impl == "auto" and cudnn_runs(q, v, interpret)):
    return _window_attention_cudnn(q, k, v, config=config, scale=scale)
  if _common.use_pallas(impl):
    from pallas_kernels import window_attention as kernel
    return kernel.window_attention(q, k, v, config=config, scale=scale,
                                   interpret=_common.resolve_interpret(interpret))
  return window_attention_xla(q, k, v, config=config, scale=scale)


def _window_attention_cudnn(q, k, v, *, config: NSAConfig, scale: float):
  """cuDNN's fused attention with a causal band of `config.window` keys.

  Its training path takes only even sequence lengths and Dk == Dv: an odd T
  gets one zero token appended, which no real query sees (causal mask), and
  v with Dv < Dk zero columns; both are sliced off the output.
  """
  T, Dk, Dv = q.shape[1], q.shape[-1], v.shape[-1]
  pad = [(0, 0), (0, T % 2), (0, 0), (0, 0)]
  o = jax.nn.dot_product_attention(
      jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad[:3] + [(0, Dk - Dv)]),
      scale=scale, is_causal=True, local_window_size=(config.window - 1, 0),
      implementation="cudnn")
  return o[:, :T, :, :Dv]


def window_attention_xla(q, k, v, *, config: NSAConfig, scale: float,
                         query_chunk: int = QUERY_CHUNK):
  """Pure-JAX reference: each query chunk reads a key slab of chunk + w - 1 keys.

  Work and memory grow with T * (chunk + w), never with T^2.
  """
  B, T, HQ, Dk = q.shape
  HKV, Dv = k.shape[2], v.shape[-1]
  G, w = HQ // HKV, config.window
  C = min(query_chunk, T)
  span = C + w - 1
  dt = _common.compute_dtype(q.dtype)
  pad = [(0, 0), (w - 1, -(-T // C) * C - T), (0, 0), (0, 0)]
  kp, vp = jnp.pad(k, pad), jnp.pad(v, pad)   # key j sits at row j + w - 1

  def chunk_fn(start, qc):
    ks = lax.dynamic_slice_in_dim(kp, start, span, axis=1)   # keys start-w+1 ..
    vs = lax.dynamic_slice_in_dim(vp, start, span, axis=1)
    t = start + jnp.arange(C)
    pos = start - (w - 1) + jnp.arange(span)
    mask = (pos[None, :] >= 0) & (pos[None, :] <= t[:, None]) & (
        pos[None, :] > t[:, None] - w)
    qg = qc.reshape(B, C, HKV, G, Dk)
    s = jnp.einsum("bchgd,bkhd->bhgck", qg, ks,
                   preferred_element_type=dt).astype(dt) * scale
    p, _ = _common.masked_softmax(s, mask)
    o = jnp.einsum("bhgck,bkhd->bchgd", p, vs.astype(dt))
    return o.reshape(B, C, HQ, Dv).astype(q.dtype)

  return _common.map_query_chunks(chunk_fn, (q,), C)
