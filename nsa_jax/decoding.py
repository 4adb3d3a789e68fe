"""Autoregressive decoding with NSA: KV caches, prefill and one-token steps.

A step is the decode op (`nsa_jax.ops.decode.nsa_decode`, paper §5.2) over the layer's
`NSACache` (docs/semantics.md#decoding). Model level (`nsa_jax.model.Transformer`; full
attention gets a plain `DenseCache`): `init_model_cache`, `model_prefill`,
`model_decode_step`. Sampling and `generate()`: `nsa_jax.sampling`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nsa_jax.config import NSAConfig
from nsa_jax.model import FullAttention
from nsa_jax.module import NativeSparseAttention
from nsa_jax.ops.decode import nsa_decode
from nsa_jax.ops.nsa import nsa
from nsa_jax.rope import apply_rope

CACHE_ALIGN = 64


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


# ----------------------------------------------------------------------------
# The cache of one NativeSparseAttention layer.
# ----------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NSACache:
  """Decoding state of one NSA layer (docs/semantics.md#decoding).

  lengths [B] int32; k_slc, v_slc, k_win, v_win [B, S, HKV, Dk/Dv] (window
  None when shared); k_cmp, v_cmp [B, Sc, HKV, Dk/Dv]; k_raw, v_raw [B, l, HKV, Dk/Dv].
  """
  lengths: jax.Array
  k_slc: jax.Array
  v_slc: jax.Array
  k_win: jax.Array | None
  v_win: jax.Array | None
  k_cmp: jax.Array
  v_cmp: jax.Array
  k_raw: jax.Array
  v_raw: jax.Array

  @property
  def capacity(self) -> int:
    return self.k_slc.shape[1]

  def window_kv(self):
    return (self.k_slc, self.v_slc) if self.k_win is None else (self.k_win, self.v_win)


def cache_rows(config: NSAConfig, max_len: int) -> tuple[int, int]:
  """(S, Sc): raw and compressed cache rows for max_len tokens, aligned for the kernel."""
  if max_len < 1:
    raise ValueError(f"max_len={max_len} must be >= 1")
  S = _round_up(max_len, max(CACHE_ALIGN, config.select_block))
  return S, _round_up(max(config.num_compressed(S), 1), CACHE_ALIGN)


def init_cache(layer: NativeSparseAttention, batch: int, max_len: int, dtype=None) -> NSACache:
  """An empty cache for `max_len` tokens per sequence (rows rounded up, `cache_rows`)."""
  if batch < 1:
    raise ValueError(f"batch={batch} must be >= 1")
  c = layer.config
  dtype = dtype or layer.q_proj.dtype
  S, Sc = cache_rows(c, max_len)
  H, Dk, Dv = layer.num_kv_heads, layer.dk, layer.dv
  z = lambda n, D: jnp.zeros((batch, n, H, D), dtype)
  separate = layer.kv_branches > 1
  return NSACache(lengths=jnp.zeros((batch,), jnp.int32),
                  k_slc=z(S, Dk), v_slc=z(S, Dv),
                  k_win=z(S, Dk) if separate else None, v_win=z(S, Dv) if separate else None,
                  k_cmp=z(Sc, Dk), v_cmp=z(Sc, Dv),
                  k_raw=z(c.compress_block, Dk), v_raw=z(c.compress_block, Dv))


def prefill(layer: NativeSparseAttention, x, lengths, cache: NSACache):
  """Runs the layer over right-padded prompts and fills an empty cache.

  Args:
    x: [B, T, d_model] prompts, sequence b valid in its first lengths[b] tokens.
    lengths: [B] int, 1 <= lengths <= T.
    cache: from `init_cache`, empty, capacity >= T.
  Returns:
    (y [B, T, d_model] = layer(x) (rows past lengths are padding), cache).
  """
  B, T, _ = x.shape
  if T > cache.capacity:
    raise ValueError(f"prompt length T={T} exceeds the cache capacity {cache.capacity}")
  inputs = layer.branch_inputs(x)
  o = nsa(**inputs, config=layer.config, impl=layer.impl)
  y = layer.o_proj(o.reshape(B, T, layer.num_heads * layer.dv))
  lengths = jnp.asarray(lengths, jnp.int32)

  put = lambda buf, new: None if buf is None else buf.at[:, :new.shape[1]].set(
      new.astype(buf.dtype))
  # Ring slot s holds the latest prompt token p < length with p % l == s.
  l = layer.config.compress_block
  slots = jnp.arange(l, dtype=jnp.int32)[None, :]
  last = lengths[:, None] - 1 - (lengths[:, None] - 1 - slots) % l
  ring = lambda raw: raw[jnp.arange(B)[:, None], jnp.clip(last, 0, T - 1)]
  k_raw, v_raw = layer.branch_kv(x)["cmp"]   # un-rotated; XLA merges it with branch_inputs'
  cache = NSACache(lengths=lengths,
                   k_slc=put(cache.k_slc, inputs["k_slc"]), v_slc=put(cache.v_slc, inputs["v_slc"]),
                   k_win=put(cache.k_win, inputs["k_win"]), v_win=put(cache.v_win, inputs["v_win"]),
                   k_cmp=put(cache.k_cmp, inputs["k_cmp"]), v_cmp=put(cache.v_cmp, inputs["v_cmp"]),
                   k_raw=ring(k_raw).astype(cache.k_raw.dtype),
                   v_raw=ring(v_raw).astype(cache.v_raw.dtype))
  # Compressed blocks that reach into padding are rewritten by the decode step
  # that completes them, before any query can see them.
  return y, cache


def decode_step(layer: NativeSparseAttention, x, cache: NSACache, *, impl: str | None = None):
  """Appends one token per sequence at position cache.lengths and attends from it.

  Args:
    x: [B, 1, d_model], the new token of each sequence.
    impl: decode-op implementation (default: the layer's).
  Returns:
    (y [B, 1, d_model], cache with lengths + 1).
  """
  B = x.shape[0]
  c = layer.config
  l, d = c.compress_block, c.compress_stride
  t = cache.lengths
  b = jnp.arange(B)
  inputs = layer.branch_inputs(x, positions=t[:, None])
  put = lambda buf, new, rows: None if buf is None else buf.at[b, rows].set(
      new[:, 0].astype(buf.dtype), mode="drop")

  k_new, v_new = layer.branch_kv(x)["cmp"]
  k_raw, v_raw = put(cache.k_raw, k_new, t % l), put(cache.v_raw, v_new, t % l)
  # Block i = (t + 1 - l) / d ends at t when that is a whole number >= 0.
  complete = (t + 1 >= l) & ((t + 1 - l) % d == 0)
  block = jnp.where(complete, (t + 1 - l) // d, cache.k_cmp.shape[1])   # out of range: dropped
  in_order = (t[:, None] - l + 1 + jnp.arange(l)[None, :]) % l
  k_blk = layer.phi_k(k_raw[b[:, None], in_order][:, None])             # [B, 1, HKV, Dk]
  v_blk = layer.phi_v(v_raw[b[:, None], in_order][:, None])
  k_blk = apply_rope(k_blk, t[:, None], layer.rope_theta)                # at i*d + l - 1 = t

  cache = NSACache(lengths=t + 1,
                   k_slc=put(cache.k_slc, inputs["k_slc"], t),
                   v_slc=put(cache.v_slc, inputs["v_slc"], t),
                   k_win=put(cache.k_win, inputs["k_win"], t),
                   v_win=put(cache.v_win, inputs["v_win"], t),
                   k_cmp=put(cache.k_cmp, k_blk, block), v_cmp=put(cache.v_cmp, v_blk, block),
                   k_raw=k_raw, v_raw=v_raw)
  k_win, v_win = cache.window_kv()
  o = nsa_decode(inputs["q"][:, 0], cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc,
                 k_win, v_win, inputs["gates"][:, 0], cache.lengths, config=c,
                 impl=layer.impl if impl is None else impl)
  return layer.o_proj(o.reshape(B, 1, -1)), cache


# ----------------------------------------------------------------------------
# The dense baseline's cache (nsa_jax.model.FullAttention), for the model's steps.
# ----------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseCache:
  """Decoding state of one FullAttention layer: lengths [B], k, v [B, S, HKV, D] (k rotated)."""
  lengths: jax.Array
  k: jax.Array
  v: jax.Array


def _dense_prefill(layer: FullAttention, x, lengths, cache: DenseCache):
  _, k, v = layer.qkv(x, jnp.arange(x.shape[1]))
  put = lambda buf, new: buf.at[:, :new.shape[1]].set(new.astype(buf.dtype))
  return layer(x), DenseCache(lengths=lengths, k=put(cache.k, k), v=put(cache.v, v))


def _dense_decode_step(layer: FullAttention, x, cache: DenseCache):
  B, t = x.shape[0], cache.lengths
  q, k, v = layer.qkv(x, t[:, None])
  b = jnp.arange(B)
  put = lambda buf, new: buf.at[b, t].set(new[:, 0].astype(buf.dtype), mode="drop")
  cache = DenseCache(lengths=t + 1, k=put(cache.k, k), v=put(cache.v, v))
  o = jax.nn.dot_product_attention(q, cache.k, cache.v, key_value_seq_lengths=cache.lengths,
                                   implementation="xla")
  return layer.o_proj(o.reshape(B, 1, -1)), cache


# ----------------------------------------------------------------------------
# Language model: prefill and decode step for nsa_jax.model.Transformer
# (attention "nsa" or "full").
# ----------------------------------------------------------------------------

def init_model_cache(model, batch: int, max_len: int) -> list:
  """One empty cache per block of an `nsa_jax.model.Transformer`."""
  def empty(layer):
    if isinstance(layer, NativeSparseAttention):
      return init_cache(layer, batch, max_len)
    S, _ = cache_rows(model.config.nsa, max_len)
    z = jnp.zeros((batch, S, layer.num_kv_heads, layer.head_dim), layer.q_proj.dtype)
    return DenseCache(lengths=jnp.zeros((batch,), jnp.int32), k=z, v=z)
  return [empty(model.layer(i).attn) for i in range(model.config.num_layers)]


def _forward(model, tokens, caches, attend):
  """`Transformer.__call__` with each block's attention call replaced by
  attend(layer, x, cache_i) -> (y, cache_i). Returns (logits, new caches)."""
  new_caches = list(caches)

  def per_layer(i, layer, h):
    y, new_caches[i] = attend(layer, h, caches[i])
    return y

  return model(tokens, attend=per_layer), new_caches


def refuse_packed(segment_ids) -> None:
  """Decoding continues one document per row: a ValueError for segment_ids."""
  if segment_ids is not None:
    raise ValueError("decoding continues one document per row and takes no segment_ids "
                     "(packed rows): give each prompt a row of its own, "
                     "right-padded, with its length in `lengths`")


def model_prefill(model, tokens, lengths, caches, *, segment_ids=None):
  """Runs right-padded prompts tokens [B, T] (valid lengths [B]) and fills the caches.

  One prompt per row: `segment_ids` (packed rows) are refused (`refuse_packed`).
  Returns (logits [B, vocab] of each prompt's last token, caches).
  """
  refuse_packed(segment_ids)
  lengths = jnp.asarray(lengths, jnp.int32)

  def attend(layer, x, cache):
    if isinstance(layer, NativeSparseAttention):
      return prefill(layer, x, lengths, cache)
    return _dense_prefill(layer, x, lengths, cache)

  logits, caches = _forward(model, tokens, caches, attend)
  return logits[jnp.arange(tokens.shape[0]), lengths - 1], caches


def model_decode_step(model, tokens, caches, *, impl: str | None = None):
  """Feeds one token per sequence, tokens [B]; returns (logits [B, vocab], caches).

  impl: NSA decode-op implementation (default: each layer's).
  """
  def attend(layer, x, cache):
    if isinstance(layer, NativeSparseAttention):
      return decode_step(layer, x, cache, impl=impl)
    return _dense_decode_step(layer, x, cache)

  logits, caches = _forward(model, tokens[:, None], caches, attend)
  return logits[:, 0], caches
