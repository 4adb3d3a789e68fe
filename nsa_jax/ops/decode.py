"""The decode op: NSA output of one new token per sequence from cached keys and values.

One new token reads only its compressed keys, its n selected blocks and its window (paper
§5.2, Table 4): `nsa_decode` is the NSA op for the last query of each sequence
(docs/semantics.md#decoding), dispatched (`nsa_jax.ops.dispatch`) to the pure-JAX
`nsa_decode_xla` or the Pallas kernel `pallas_kernels/decode_attention.py`
(docs/kernels.md#decode-kernel). The caches it reads: `nsa_jax.decoding`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common, dispatch
from nsa_jax.ops.selection import group_block_scores, rank_blocks
from pallas_kernels import decode_attention as kernel


def num_visible_compressed(t, config: NSAConfig):
  """Compressed blocks visible to the query at position t: i*d + l - 1 <= t."""
  return jnp.maximum((t + 1 - config.compress_block) // config.compress_stride + 1, 0)


def decode_selection(p_cmp, t, config: NSAConfig, seq_len: int):
  """Top-n selection blocks of one query per sequence (paper Eq. 9-11; heads
  aggregated as config.group_score says).

  Args:
    p_cmp: [B, HKV, G, Sc] compressed-branch probabilities (0 where not visible).
    t: [B] query positions.
    seq_len: cache rows; scores cover its `num_select_blocks(seq_len)` blocks.
  Returns:
    block_idx [B, HKV, n] int32, -1 in unused slots.
  """
  # Compressed blocks past num_compressed(seq_len) cannot exist (alignment padding).
  p = p_cmp[..., :config.num_compressed(seq_len)]
  scores = group_block_scores(p, config, config.num_select_blocks(seq_len))
  rank_one = lambda s, tb: rank_blocks(s[:, None, :], tb[None], config)[:, 0]
  return jax.vmap(rank_one)(scores, t)


def _check_decode_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths):
  if getattr(q, "ndim", None) != 3:
    raise ValueError(f"q must have shape [batch, heads, dim] (one token per sequence), "
                     f"got shape {getattr(q, 'shape', None)}")
  q4 = q[:, None]
  S = k_slc.shape[1] if getattr(k_slc, "ndim", None) == 4 else None
  _common.check_attention_inputs(q4, k_slc, v_slc, names=("q", "k_slc", "v_slc"), seq_len=S)
  _common.check_attention_inputs(q4, k_win, v_win, names=("q", "k_win", "v_win"), seq_len=S)
  Sc = k_cmp.shape[1] if getattr(k_cmp, "ndim", None) == 4 else None
  _common.check_attention_inputs(q4, k_cmp, v_cmp, names=("q", "k_cmp", "v_cmp"), seq_len=Sc)
  B, HQ, _ = q.shape
  if gates.shape != (B, HQ, 3):
    raise ValueError(f"gates.shape={gates.shape} must be [B, HQ, 3]={(B, HQ, 3)}")
  _common.check_float("gates", gates, q.dtype)
  if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be an integer array of shape [B]=({B},), got "
                     f"shape {lengths.shape} dtype {lengths.dtype}")
  try:   # concrete lengths are checked here; traced ones are clamped by nsa_decode
    lo, hi = int(jnp.min(lengths)), int(jnp.max(lengths))
  except jax.errors.ConcretizationTypeError:
    return
  S = k_slc.shape[1]
  if lo < 1 or hi > S:
    raise ValueError(f"lengths must be in 1 .. S={S} (the cache rows), got min {lo}, max {hi}")


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *,
               config: NSAConfig, scale: float | None = None, impl: str = "auto",
               interpret: bool | None = None, return_block_idx: bool = False):
  """NSA output of the last token of each sequence, from cached keys and values.

  Equals row t = lengths - 1 of `nsa_jax.nsa` over the first `lengths` cache rows.

  Args:
    q: [B, HQ, Dk] query of the token at position lengths - 1.
    k_cmp, v_cmp: [B, Sc, HKV, Dk/Dv] compressed keys/values (rows past the
      visible ones are ignored).
    k_slc, v_slc, k_win, v_win: [B, S, HKV, Dk/Dv] raw keys/values, token p at row p.
    gates: [B, HQ, 3] gates (cmp, slc, win), already through a sigmoid.
    lengths: [B] int, tokens in each sequence, the query's own included,
      1 <= lengths <= S. Out of range: a ValueError when lengths is concrete;
      under jit, clamped to 1 .. S (the kernel never reads past the cache).
    impl: "xla", "pallas" or "auto" (the kernel on GPU where it supports the shapes).
    return_block_idx: also return the [B, HKV, n] selection.

  Returns:
    o [B, HQ, Dv] in q.dtype (and block_idx when asked).
  """
  _common.check_config(config)
  _check_decode_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths)
  scale = _common.resolve_scale(scale, q)
  args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths.astype(jnp.int32))
  names = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates", "lengths")
  backend = dispatch.choose("nsa_decode", impl,
                            dispatch.Call(dict(zip(names, args)), config, interpret))
  if backend == "pallas":   # the kernel clamps lengths itself
    o, block_idx = kernel.nsa_decode(*args, sizes=_common.selection_sizes(config),
                                     window=config.window, scale=scale,
                                     interpret=_common.resolve_interpret(interpret))
    return (o, block_idx) if return_block_idx else o
  o, block_idx = nsa_decode_xla(*args[:-1], jnp.clip(args[-1], 1, k_slc.shape[1]),
                                config=config, scale=scale)
  return (o, block_idx) if return_block_idx else o


def _rows(cache, pos):
  """cache [B, S, HKV, D] at positions pos [B, N, HKV or 1] (clipped) -> [B, N, HKV, D]."""
  B, S, H, _ = cache.shape
  pos = jnp.clip(pos, 0, S - 1)
  return cache[jnp.arange(B)[:, None, None], pos, jnp.arange(H)[None, None, :]]


def _attend(qg, k, v, visible, scale: float):
  """Softmax attention of qg [B, HKV, G, Dk] over k/v [B, N, HKV, D] where visible [B, N, HKV or 1].

  Returns (o [B, HKV, G, Dv], p [B, HKV, G, N]) in the compute dtype.
  """
  dt = _common.compute_dtype(qg.dtype)
  s = jnp.einsum("bhgd,bnhd->bhgn", qg, k, preferred_element_type=dt).astype(dt) * scale
  p, _ = _common.masked_softmax(s, jnp.moveaxis(visible, 1, 2)[:, :, None, :])
  return jnp.einsum("bhgn,bnhd->bhgd", p, v.astype(dt)), p


def nsa_decode_xla(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *,
                   config: NSAConfig, scale: float):
  """Pure-JAX reference of `nsa_decode`: gathers the selected and window keys.

  Returns (o [B, HQ, Dv], block_idx [B, HKV, n]).
  """
  B, HQ, Dk = q.shape
  Sc, HKV = k_cmp.shape[1], k_cmp.shape[2]
  S, lp, w = k_slc.shape[1], config.select_block, config.window
  qg = q.reshape(B, HKV, HQ // HKV, Dk)
  t = lengths - 1
  ar = lambda n: jnp.arange(n, dtype=jnp.int32)

  cmp_visible = (ar(Sc)[None, :] < num_visible_compressed(t, config)[:, None])[..., None]
  o_cmp, p_cmp = _attend(qg, k_cmp, v_cmp, cmp_visible, scale)

  block_idx = decode_selection(p_cmp, t, config, S)                # [B, HKV, n]
  pos = (block_idx[..., None] * lp + ar(lp)[None, None, None, :]).reshape(B, HKV, -1)  # n*l' rows
  slc_visible = (jnp.repeat(block_idx, lp, axis=-1) >= 0) & (pos <= t[:, None, None])
  pos, slc_visible = jnp.swapaxes(pos, 1, 2), jnp.swapaxes(slc_visible, 1, 2)
  o_slc, _ = _attend(qg, _rows(k_slc, pos), _rows(v_slc, pos), slc_visible, scale)

  pos = (t[:, None] - w + 1 + ar(w)[None, :])[..., None]                    # [B, w, 1]
  o_win, _ = _attend(qg, _rows(k_win, pos), _rows(v_win, pos), pos >= 0, scale)

  g = gates.reshape(B, HKV, HQ // HKV, 3, 1).astype(o_cmp.dtype)
  o = g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win
  return o.reshape(B, HQ, -1).astype(q.dtype), block_idx
