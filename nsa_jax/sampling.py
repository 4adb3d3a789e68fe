"""Sampling and `generate()`: a jit-compiled `lax.fori_loop` of decode steps.

`generate()` prefills the caches (`nsa_jax.decoding.model_prefill`), then picks each new
token from the logits of `nsa_jax.decoding.model_decode_step`, greedy or temperature /
top-k / top-p (`Sampling`, docs/api.md#the-model).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax.decoding import init_model_cache, model_decode_step, model_prefill, refuse_packed


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
