"""Pieces shared by the NSA ops: input checks, chunking, softmax, the kernels' sizes.

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
from pallas_kernels._util import pad_to, saved
from pallas_kernels.scoring import Selection

def selection_sizes(config: NSAConfig) -> Selection:
  """The selection's block sizes as the Pallas kernels take them."""
  return Selection(compress_block=config.compress_block,
                   compress_stride=config.compress_stride, select_block=config.select_block,
                   num_selected=config.num_selected, num_initial=config.num_initial,
                   num_local=config.num_local, group_score=config.group_score)


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


def check_impl(impl: str, allowed: tuple[str, ...] = ("auto", "xla", "pallas")) -> None:
  if impl not in allowed:
    raise ValueError(f"impl={impl!r} must be one of {allowed}")


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


def split_rows(x, chunks: int, rows: int):
  """[B, T, ...] -> [chunks, B, rows, ...]: axis 1 padded to chunks * rows and cut."""
  x = pad_to(x, (x.shape[0], chunks * rows) + x.shape[2:])
  return jnp.moveaxis(x.reshape(x.shape[0], chunks, rows, *x.shape[2:]), 1, 0)


def join_rows(y, T: int):
  """[chunks, B, rows, ...] -> [B, T, ...]: the inverse of `split_rows`, padding dropped."""
  y = jnp.moveaxis(y, 0, 1)
  return y.reshape(y.shape[0], -1, *y.shape[3:])[:, :T]


def map_query_chunks(fn: Callable, xs: Sequence[jax.Array], chunk: int, first: int = 0,
                     save: bool = True):
  """Applies `fn(start, *x_chunks)` to query chunks along axis 1 with `lax.map`.

  Each x in `xs` is [B, T, ...]; T is padded up to a multiple of `chunk` (the
  padded rows are computed and dropped). `start` is the chunk's first query
  position, `first` that of xs' first row (for a slice of the queries). `fn`
  returns a pytree of [B, chunk, ...] arrays; the result is the same pytree
  with [B, T, ...] arrays. Keeps live memory at one chunk's worth of scores
  instead of all T queries' worth, in the backward pass too: each chunk is
  rematerialised (`jax.checkpoint`) rather than saved. With `save` the results are
  named `saved`, as the selection's and the selected kernel's outputs are: the NSA
  layer's checkpoint policy keeps them (`nsa_jax.ops.nsa.SAVE_POLICY`); without, the
  layer's backward makes them again (the window and compressed branches: cheap).
  """
  T = xs[0].shape[1]
  chunk = min(chunk, T)
  n = -(-T // chunk)
  starts = first + jnp.arange(n, dtype=jnp.int32) * chunk
  body = jax.checkpoint(lambda a: fn(a[0], *a[1:]))
  out = lax.map(body, (starts, *(split_rows(x, n, chunk) for x in xs)))
  out = jax.tree.map(lambda y: join_rows(y, T), out)
  return saved(out) if save else out
