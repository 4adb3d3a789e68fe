"""The language model: full attention vs a naive reference, causality, sizes, dtypes, errors;
remat and stacked (scanned) layers compute the plain model's loss and gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax.config import NSAConfig
from nsa_jax.model import (FullAttention, ModelConfig, Transformer, count_params, stack_layers,
                           unstack_layers)
from nsa_jax.rope import apply_rope
from tests import rand

TINY_NSA = NSAConfig(compress_block=16, compress_stride=8, select_block=32, num_selected=4,
                     num_initial=1, num_local=2, window=32)


def tiny_config(**kw):
  return ModelConfig(**{"d_model": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                        "nsa": TINY_NSA, "impl": "xla", **kw})


def forward(model):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)), state


def test_full_attention_matches_naive_gqa_with_rope():
  B, T, H, HKV, D, d_model = 2, 12, 4, 2, 8, 16
  attn = FullAttention(d_model, H, HKV, head_dim=D, rope_theta=10000.0, dtype=jnp.float32,
                       rngs=nnx.Rngs(0))
  x = rand.normal(rand.key(1), (B, T, d_model), jnp.float32)

  @nnx.jit   # the layer and the naive reference in one compile, not one per op
  def both(attn, x):
    pos = jnp.arange(T)
    q = apply_rope((x @ attn.q_proj.kernel[...]).reshape(B, T, H, D), pos)
    kv = (x @ attn.kv_proj.kernel[...]).reshape(B, T, HKV, 2, D)   # head-major columns
    k = jnp.repeat(apply_rope(kv[:, :, :, 0], pos), H // HKV, axis=2)
    v = jnp.repeat(kv[:, :, :, 1], H // HKV, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v).reshape(B, T, H * D)
    return attn(x), o @ attn.o_proj.kernel[...]
  np.testing.assert_allclose(*both(attn, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_model_is_causal(attention):
  """Changing token t changes no logits before t, and changes the logits at t."""
  model = Transformer(tiny_config(attention=attention), rngs=nnx.Rngs(0))
  fwd, state = forward(model)
  T, t = 160, 120  # 5 selection blocks (one slot chosen by score), several windows
  tokens = rand.randint(rand.key(2), (2, T), 0, 256, jnp.int32)
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % 256)
  a, b = fwd(state, tokens), fwd(state, changed)
  assert a.shape == (2, T, 256) and a.dtype == jnp.float32
  assert np.all(np.isfinite(a))
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert np.max(np.abs(a[:, t:] - b[:, t:])) > 1e-4


def test_parameter_counts():
  """Full and NSA models share everything but NSA's own parameters."""
  count = lambda **kw: count_params(Transformer(tiny_config(**kw), rngs=nnx.Rngs(0)))
  full, shared = count(attention="full"), count(attention="nsa", shared_kv=True)
  nsa_model = Transformer(tiny_config(attention="nsa", shared_kv=True), rngs=nnx.Rngs(0))
  own = sum(count_params(getattr(block.attn, name)) for block in nsa_model.blocks
            for name in ("gate", "phi_k", "phi_v"))
  assert shared - full == own > 0
  c = tiny_config()
  kv_proj = c.d_model * c.num_kv_heads * 2 * c.head_size
  assert count(attention="nsa") - shared == 2 * kv_proj * c.num_layers  # separate K/V per branch
  assert count(attention="full", tie_embeddings=False) - full == 256 * c.d_model


# the plain models', shared by the cases below (which alternate nsa and full: 4 entries keep
# both plain models while each case adds its own)
@functools.lru_cache(maxsize=4)
def loss_and_grads(config):
  """Loss and parameter gradients of the tiny model of `config` (seed 0) on packed rows."""
  model = Transformer(config, rngs=nnx.Rngs(0))
  T = 96
  tokens = rand.randint(rand.key(4), (2, T + 1), 0, 256, jnp.int32)
  segment_ids = (jnp.arange(T)[None, :] >= jnp.array([[64], [32]])).astype(jnp.int32)

  def loss(model):
    logits = model(tokens[:, :-1], segment_ids=segment_ids)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return jax.jit(jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p, rest))))(params)


@pytest.mark.parametrize("attention", ["nsa", "full"])
@pytest.mark.parametrize("remat, scan_layers", [("layer", False), ("dots", False),
                                                ("keep", False), ("none", True),
                                                ("layer", True)])
def test_remat_and_scan_compute_the_plain_models_loss_and_gradients(attention, remat,
                                                                    scan_layers):
  """Same parameters (the plain model's, stacked for scan_layers; a seed gives the same
  values in both layouts): the same loss and gradients to float32 rounding. (Remat is bit
  for bit on a CPU; the scanned program adds in another order: a few ulps of a gradient's
  largest entry, 6e-7 of it measured, hence 1e-5 of it allowed.)"""
  plain = tiny_config(attention=attention)
  other = tiny_config(attention=attention, remat=remat, scan_layers=scan_layers)
  (want_loss, want), (got_loss, got) = loss_and_grads(plain), loss_and_grads(other)
  if scan_layers:   # the seed-0 scanned model holds the seed-0 plain model's parameters
    jax.tree.map(np.testing.assert_array_equal, nnx.state(Transformer(other, rngs=nnx.Rngs(0))),
                 stack_layers(nnx.state(Transformer(plain, rngs=nnx.Rngs(0)))))
    got = unstack_layers(got)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert np.max(np.abs(g - w)) <= 1e-5 * np.max(np.abs(w))


def test_bf16_compute_keeps_f32_parameters_and_logits():
  config = tiny_config(attention="full")
  model32 = Transformer(config, rngs=nnx.Rngs(0))
  model16 = Transformer(tiny_config(attention="full", dtype="bfloat16"), rngs=nnx.Rngs(0))
  params = jax.tree.leaves(nnx.state(model16, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  tokens = rand.randint(rand.key(3), (1, 64), 0, 256, jnp.int32)
  hidden = model16.embed(tokens)
  assert hidden.dtype == jnp.bfloat16
  # both models in one compile, not one per primitive op by op
  a, b = nnx.jit(lambda m32, m16, tokens: (m32(tokens), m16(tokens)))(model32, model16, tokens)
  assert b.dtype == jnp.float32
  # bf16 keeps ~3 significant digits; logits here are O(1).
  np.testing.assert_allclose(a, b, atol=0.1, rtol=0.05)


def test_config_errors_name_the_values():
  with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
    ModelConfig(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="d_model=100 must be a multiple of num_heads=8"):
    ModelConfig(d_model=100, num_heads=8)
  with pytest.raises(ValueError, match="attention='sparse'"):
    ModelConfig(attention="sparse")
  with pytest.raises(ValueError,
                     match=r"remat='all' must be one of \('none', 'keep', 'layer', 'dots'\)"):
    ModelConfig(remat="all")
  config = tiny_config()
  with pytest.raises(ValueError, match="seq_len=8 is shorter than one compressed block"):
    config.check_seq_len(8)
  four_forced = ModelConfig(nsa=NSAConfig(compress_block=16, compress_stride=8,
                                          select_block=32, num_selected=4, num_initial=1,
                                          num_local=3, window=32))
  with pytest.raises(ValueError, match="seq_len=96 holds only 3 selection blocks"):
    four_forced.check_seq_len(96)
  config.check_seq_len(128)  # 4 selection blocks: one chosen by score
  tiny_config(attention="full").check_seq_len(8)
