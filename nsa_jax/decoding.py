"""Autoregressive decoding with NSA: a KV cache, prefill, one-token steps, generate().

NSA decodes cheaply because one new token reads only its compressed keys, its n
selected blocks and its window (paper §5.2 "Decoding Speed", Table 4; KERNELS.md
"Decoding"): about 5.6k keys per KV group at 64k context instead of 64k.

Cache (`NSACache`, one per layer, preallocated for a maximum length, batched,
with a length per sequence):
- `k_slc`/`v_slc`: the selected branch's raw keys/values (RoPE applied), and
  `k_win`/`v_win` the window's own when the branches have separate K/V
  (`None` with `shared_kv`, the window then reads `k_slc`/`v_slc`);
- `k_cmp`/`v_cmp`: compressed keys/values. Block i (tokens i*d .. i*d+l-1) is
  appended by the step that writes its last token, from `k_raw`/`v_raw`, a ring
  buffer of the compression branch's un-rotated keys/values of the last l tokens
  (slot p % l holds token p). Nothing is ever recompressed.
Sequence lengths (rows) are padded up to multiples of `CACHE_ALIGN` so that the
Pallas kernel only ever reads whole tiles inside the arrays.

One decode step is the NSA op for the last query of a sequence (SPEC §3):
compressed blocks visible iff i*d + l - 1 <= t, the top-n selection of
`nsa_jax.ops.selection` (same overlap weights and ranking, by calling its
helpers), selected blocks causally masked, and the window of w keys ending at t.
`nsa_decode` is that op, with the pure-JAX `nsa_decode_xla` beside the Pallas
kernel `pallas_kernels/decode_attention.py`.

Model level (`nsa_jax.model.Transformer`; its "full" attention baseline gets a
plain K/V cache, `DenseCache`): `init_model_cache`, `model_prefill`,
`model_decode_step`, and `generate()`:
jit-compiled, a fixed-shape `lax.fori_loop` over new tokens, greedy or
temperature / top-k / top-p sampling (`Sampling`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax.config import NSAConfig
from nsa_jax.model import FullAttention
from nsa_jax.module import NativeSparseAttention
from nsa_jax.ops import _common, dispatch
from nsa_jax.ops.nsa import nsa
from nsa_jax.ops.selection import group_block_scores, rank_blocks
from nsa_jax.rope import apply_rope
from pallas_kernels import decode_attention as kernel

CACHE_ALIGN = 64


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


# ----------------------------------------------------------------------------
# The decode op: one query per sequence against cached keys and values.
# ----------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------
# The cache of one NativeSparseAttention layer.
# ----------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NSACache:
  """Decoding state of one NSA layer (see the module docstring).

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
# The dense baseline's cache (nsa_jax.model.FullAttention), for generate().
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
# Language model: prefill, decode step and generate() for nsa_jax.model.Transformer
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
                     "(packed rows, SPEC §6): give each prompt a row of its own, "
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


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How generate() picks the next token.

  temperature: 0 for greedy (argmax), else logits / temperature are sampled.
  top_k: keep the k most likely tokens (0: all).
  top_p: keep the smallest set of most likely tokens whose probability reaches
    top_p (nucleus sampling; 1: all). Both filters may be combined.
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"Sampling.temperature={self.temperature} must be >= 0")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"Sampling.top_k={self.top_k!r} must be an int >= 0")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"Sampling.top_p={self.top_p} must be in (0, 1]")


def sample(logits, key, sampling: Sampling):
  """Next tokens [B] int32 from logits [B, vocab]."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs     # mass of the more likely tokens
    cut = jnp.min(jnp.where(before < sampling.top_p, desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cut, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model, prompt, key, *, max_new_tokens: int, lengths=None,
             sampling: Sampling = Sampling(), max_len: int | None = None,
             impl: str | None = None, segment_ids=None):
  """Continues right-padded prompts [B, T] by max_new_tokens tokens each.

  Sequence b continues from its first lengths[b] tokens (default: all T); one
  prompt per row (`segment_ids`: a ValueError, `refuse_packed`).
  Prefill runs the training-time ops; the new tokens come from a jit-compiled
  `lax.fori_loop` of `model_decode_step` (fixed shapes, no early stop at an
  end-of-sequence token: cut the output afterwards).

  Returns:
    tokens [B, max_new_tokens] int32.
  """
  refuse_packed(segment_ids)
  B, T = prompt.shape
  max_len = max_len or T + max_new_tokens
  if max_new_tokens < 1 or T + max_new_tokens > max_len:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 and T + "
                     f"max_new_tokens = {T + max_new_tokens} <= max_len={max_len}")
  lengths = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt, lengths, key, max_new_tokens=max_new_tokens,
                   sampling=sampling, max_len=max_len, impl=impl)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling",
                                             "max_len", "impl"))
def _generate(graphdef, state, prompt, lengths, key, *, max_new_tokens, sampling,
              max_len, impl):
  model = nnx.merge(graphdef, state)
  logits, caches = model_prefill(model, prompt, lengths,
                                 init_model_cache(model, prompt.shape[0], max_len))
  key, sub = jax.random.split(key)
  token = sample(logits, sub, sampling)
  out = jnp.zeros((prompt.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(token)

  def step(i, carry):
    out, token, caches, key = carry
    logits, caches = model_decode_step(model, token, caches, impl=impl)
    key, sub = jax.random.split(key)
    token = sample(logits, sub, sampling)
    return out.at[:, i].set(token), token, caches, key

  return jax.lax.fori_loop(1, max_new_tokens, step, (out, token, caches, key))[0]
