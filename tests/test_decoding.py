"""Decoding (the op nsa_jax.ops.decode and pallas_kernels/decode_attention.py, the caches of
nsa_jax.decoding, nsa_jax.sampling) against one full forward pass.

Small blocks (l=8, d=4, l'=16, n=4, w=24) so that a few dozen tokens cross
compressed-block, selection-block and window boundaries. Each function is
jit-compiled once; lengths vary as data.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax import NSAConfig, nsa
from nsa_jax import decoding, sampling
from nsa_jax.model import ModelConfig, Transformer
from nsa_jax.module import NativeSparseAttention
from nsa_jax.ops import decode
from tests import rand

CFG = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=4,
                num_initial=1, num_local=2, window=24)
# float32 everywhere; differences come from summation order only.
TOL = dict(rtol=2e-5, atol=2e-5)


def _normal(key, shape):
  return rand.normal(key, shape, jnp.float32)


def _pad_rows(x, rows):
  return jnp.pad(x, [(0, 0), (0, rows - x.shape[1]), (0, 0), (0, 0)])


@pytest.mark.parametrize("group_score", ["sum", "max"])
@pytest.mark.parametrize("impl,HKV,G", [("xla", 2, 3), ("pallas", 2, 3), ("pallas", 1, 32)])
def test_nsa_decode_is_last_row_of_nsa(impl, HKV, G, group_score):
  """One decode query == row t of the full op, selection included, at many
  lengths; G = 3 pads the kernel's head tile to 16 rows, G = 32 exceeds it; the
  heads' block scores summed (Eq. 10) or their max (config.group_score)."""
  config = dataclasses.replace(CFG, group_score=group_score)
  B, T, Dk, Dv = 2, 70, 16, 32
  ks = rand.split(rand.key(0), 8)
  q = _normal(ks[0], (B, T, HKV * G, Dk))
  Tc = CFG.num_compressed(T)
  k_cmp, v_cmp = _normal(ks[1], (B, Tc, HKV, Dk)), _normal(ks[2], (B, Tc, HKV, Dv))
  k_slc, k_win = _normal(ks[3], (B, T, HKV, Dk)), _normal(ks[4], (B, T, HKV, Dk))
  v_slc, v_win = _normal(ks[5], (B, T, HKV, Dv)), _normal(ks[6], (B, T, HKV, Dv))
  gates = jax.nn.sigmoid(_normal(ks[7], (B, T, HKV * G, 3)))
  want, want_idx = jax.jit(functools.partial(nsa, config=config, impl="xla",
                                             return_block_idx=True))(
      q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
  S, Sc = 128, 64      # aligned cache sizes, rows past T are zero
  caches = [_pad_rows(x, Sc) for x in (k_cmp, v_cmp)] + [
      _pad_rows(x, S) for x in (k_slc, v_slc, k_win, v_win)]

  @jax.jit
  def step(lengths):
    t = lengths - 1
    b = jnp.arange(B)
    return decode.nsa_decode(q[b, t], *caches, gates[b, t], lengths, config=config,
                               impl=impl, interpret=True, return_block_idx=True)

  # 1: nothing compressed; 7/8/9: around the first compressed block; 16/17: a
  # new selection block; 24/25: the window fills; 70: all.
  for a, b in [(1, 8), (7, 9), (16, 17), (24, 25), (31, 33), (48, 70)]:
    lengths = jnp.array([a, b], jnp.int32)
    o, idx = step(lengths)
    for i, L in enumerate((a, b)):
      np.testing.assert_allclose(o[i], want[i, L - 1], **TOL)
      for h in range(HKV):
        got = set(np.asarray(idx[i, h]).tolist())
        assert got == set(np.asarray(want_idx[i, L - 1, h]).tolist())


@pytest.mark.parametrize("target_programs", [1024, 2])
def test_nsa_decode_kernel_paper_block_sizes(target_programs, monkeypatch):
  """Paper sizes (l=32, d=16, l'=64, n=16, w=512), where the decode kernel's
  64-block tiles of compressed keys each straddle 17 selection blocks: the
  kernel's block scores pick the reference's blocks and give its output.
  With 2 target programs each branch is one program walking all its tiles
  (as at large batch); with 1024, one tile per program (as at batch 1)."""
  from pallas_kernels import decode_attention
  monkeypatch.setattr(decode_attention, "TARGET_PROGRAMS", target_programs)
  cfg = NSAConfig()
  B, T, HKV, G, D = 2, 1100, 1, 2, 16
  ks = rand.split(rand.key(3), 8)
  q = _normal(ks[0], (B, T, HKV * G, D))
  Tc = cfg.num_compressed(T)
  k_cmp, v_cmp = _normal(ks[1], (B, Tc, HKV, D)), _normal(ks[2], (B, Tc, HKV, D))
  k_slc, k_win, v_slc, v_win = (_normal(k, (B, T, HKV, D)) for k in ks[3:7])
  gates = jax.nn.sigmoid(_normal(ks[7], (B, T, HKV * G, 3)))
  want, want_idx = jax.jit(functools.partial(nsa, config=cfg, impl="xla", return_block_idx=True))(
      q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
  caches = [_pad_rows(x, 128) for x in (k_cmp, v_cmp)] + [
      _pad_rows(x, 1152) for x in (k_slc, v_slc, k_win, v_win)]
  lengths = jnp.array([1100, 700], jnp.int32)
  b = jnp.arange(B)
  o, idx = decode.nsa_decode(q[b, lengths - 1], *caches, gates[b, lengths - 1], lengths,
                               config=cfg, impl="pallas", interpret=True, return_block_idx=True)
  for i, L in enumerate((1100, 700)):
    np.testing.assert_allclose(o[i], want[i, L - 1], **TOL)
    assert set(np.asarray(idx[i, 0]).tolist()) == set(np.asarray(want_idx[i, L - 1, 0]).tolist())


def _layer(shared_kv, impl):
  return NativeSparseAttention(32, 4, 2, head_dim=16, config=CFG, shared_kv=shared_kv,
                               impl=impl, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("shared_kv,impl", [(False, "xla"), (True, "xla"), (False, "pallas")])
def test_layer_decoding_matches_forward(shared_kv, impl):
  """Prefill prompts of different lengths, then decode token by token == layer(x)."""
  B, T = 2, 60
  layer = _layer(shared_kv, impl="xla")
  x = _normal(rand.key(1), (B, T, 32))
  graphdef, state = nnx.split(layer)
  want = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)
  prompt_lengths = jnp.array([5, 13], jnp.int32)
  P = 13

  @jax.jit
  def run_prefill(state, x):
    layer = nnx.merge(graphdef, state)
    return decoding.prefill(layer, x, prompt_lengths, decoding.init_cache(layer, B, T))

  @jax.jit
  def run_step(state, x, cache):
    return decoding.decode_step(nnx.merge(graphdef, state), x, cache, impl=impl)

  y, cache = run_prefill(state, x[:, :P])
  np.testing.assert_allclose(y[0, :5], want[0, :5], **TOL)
  np.testing.assert_allclose(y[1], want[1, :P], **TOL)
  b = jnp.arange(B)
  for _ in range(T - P):
    t = cache.lengths
    y, cache = run_step(state, x[b, t][:, None], cache)
    np.testing.assert_allclose(y[:, 0], want[b, t], **TOL)
  assert cache.lengths.tolist() == [T - P + 5, T]


@pytest.mark.parametrize("attention, scan_layers", [("nsa", False), ("full", False),
                                                   ("nsa", True)])
def test_model_decoding_matches_forward_and_greedy_generate(attention, scan_layers):
  """Also with the blocks stacked (scan_layers): decoding runs them one by one."""
  B, T = 2, 40
  config = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, nsa=CFG, attention=attention, impl="xla",
                       scan_layers=scan_layers)
  model = Transformer(config, rngs=nnx.Rngs(0))
  tokens = rand.randint(rand.key(2), (B, T), 0, 64, jnp.int32)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  want = forward(state, tokens)
  lengths = jnp.array([3, 9], jnp.int32)

  @jax.jit
  def run(state, tokens):
    model = nnx.merge(graphdef, state)
    logits, caches = decoding.model_prefill(model, tokens[:, :9], lengths,
                                            decoding.init_model_cache(model, B, T))
    b = jnp.arange(B)

    def step(caches, i):
      logits, caches = decoding.model_decode_step(model, tokens[b, lengths + i], caches)
      return caches, logits
    _, rest = jax.lax.scan(step, caches, jnp.arange(T - 9))
    return logits, rest

  first, rest = run(state, tokens)
  np.testing.assert_allclose(first, want[jnp.arange(B), lengths - 1], **TOL)
  for i in range(T - 9):
    np.testing.assert_allclose(rest[i], want[jnp.arange(B), lengths + i], **TOL)

  # Greedy generation continues each prompt with the full forward's argmax.
  new = sampling.generate(model, tokens[:, :9], jax.random.key(3), max_new_tokens=6,
                          lengths=lengths)
  seqs = jnp.zeros((B, T), jnp.int32)      # prompt + generated, zero-padded (causal)
  for i in range(B):
    seqs = seqs.at[i, :lengths[i] + 6].set(jnp.concatenate([tokens[i, :lengths[i]], new[i]]))
  logits = forward(state, seqs)
  for i in range(B):
    L = int(lengths[i])
    np.testing.assert_array_equal(new[i], jnp.argmax(logits[i, L - 1:L + 5], axis=-1))
  # Sampling inside generate(): top_k=1 leaves only the argmax.
  sampled = sampling.generate(model, tokens[:, :9], jax.random.key(5), max_new_tokens=6,
                              lengths=lengths,
                              sampling=sampling.Sampling(temperature=0.7, top_k=1, top_p=0.9))
  np.testing.assert_array_equal(sampled, new)


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4096, jnp.float32))
  key = jax.random.key(4)
  greedy = sampling.sample(logits, key, sampling.Sampling())
  assert set(np.asarray(greedy).tolist()) == {0}
  top2 = sampling.sample(logits, key, sampling.Sampling(temperature=1.0, top_k=2))
  assert set(np.asarray(top2).tolist()) == {0, 1}
  # Nucleus 0.7: tokens 0 and 1 (0.5 before token 1 < 0.7, 0.8 before token 2).
  nucleus = sampling.sample(logits, key, sampling.Sampling(temperature=1.0, top_p=0.7))
  assert set(np.asarray(nucleus).tolist()) == {0, 1}
  counts = np.bincount(np.asarray(sampling.sample(logits, key, sampling.Sampling(temperature=1.0))),
                       minlength=4) / 4096
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)   # ~4 sigma at n=4096


def test_errors_name_values():
  with pytest.raises(ValueError, match="top_p=1.5"):
    sampling.Sampling(temperature=1.0, top_p=1.5)
  layer = _layer(False, "xla")
  cache = decoding.init_cache(layer, 1, 16)
  with pytest.raises(ValueError, match="T=80"):
    decoding.prefill(layer, jnp.zeros((1, 80, 32), jnp.float32), jnp.array([80]), cache)
  q = jnp.zeros((1, 4, 24), jnp.float32)
  kv = jnp.zeros((1, 64, 2, 24), jnp.float32)
  with pytest.raises(ValueError, match="Dk=24"):
    decode.nsa_decode(q, kv, kv, kv, kv, kv, kv, jnp.zeros((1, 4, 3), jnp.float32),
                        jnp.array([3]), config=CFG, impl="pallas")
  with pytest.raises(ValueError, match="gates.shape"):
    decode.nsa_decode(q, kv, kv, kv, kv, kv, kv, jnp.zeros((1, 4, 2), jnp.float32),
                        jnp.array([3]), config=CFG)
  q2, kv2 = jnp.zeros((2, 4, 24), jnp.float32), jnp.zeros((2, 64, 2, 24), jnp.float32)
  with pytest.raises(ValueError, match=r"1 \.\. S=64 \(the cache rows\), got min 0, max 65"):
    decode.nsa_decode(q2, kv2, kv2, kv2, kv2, kv2, kv2, jnp.zeros((2, 4, 3), jnp.float32),
                        jnp.array([0, 65]), config=CFG)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_traced_lengths_past_the_cache_are_clamped(impl):
  """Under jit, lengths past the cache rows act as the cache's length (the
  kernel never reads past the cache); a concrete out-of-range value raises."""
  B, S, HKV, G, D = 2, 64, 1, 2, 16
  ks = rand.split(rand.key(5), 8)
  cache = [_normal(k, (B, n, HKV, D)) for k, n in zip(ks[1:7], (32, 32, S, S, S, S))]
  q, gates = _normal(ks[0], (B, G, D)), jax.nn.sigmoid(_normal(ks[7], (B, G, 3)))
  step = jax.jit(lambda n: decode.nsa_decode(q, *cache, gates, n, config=CFG, impl=impl,
                                               interpret=True))
  np.testing.assert_allclose(step(jnp.array([S + 7, 3])), step(jnp.array([S, 3])), **TOL)
  with pytest.raises(ValueError, match=f"got min 3, max {S + 7}"):
    decode.nsa_decode(q, *cache, gates, jnp.array([S + 7, 3]), config=CFG, impl=impl,
                        interpret=True)


def test_decode_top_n_is_lax_top_k():
  """The decode kernel's ranking (`decode_attention._top_n`, in a kernel over a
  2D score tile) == lax.top_k: descending, ties to the lower index, +-inf, a
  row with no finite value; -1 where the value is -inf and in padding slots."""
  from jax.experimental import pallas as pl
  from pallas_kernels.decode_attention import _top_n
  rng = np.random.default_rng(0)
  x = rng.integers(0, 5, (6, 8, 16)).astype(np.float32)   # many ties
  x[..., 3] = np.inf
  x[0] = -np.inf                                        # a row with no candidate
  x.reshape(-1)[::5] = -np.inf
  n, n_pad = 12, 16

  def kernel(x_ref, out_ref):
    index = (jnp.arange(8, dtype=jnp.int32)[:, None] * 16
             + jnp.arange(16, dtype=jnp.int32)[None, :])
    out_ref[...] = _top_n(x_ref[...], index, n, n_pad)

  got = pl.pallas_call(kernel, grid=(6,), in_specs=[pl.BlockSpec((None, 8, 16), lambda r: (r, 0, 0))],
                       out_specs=pl.BlockSpec((None, n_pad), lambda r: (r, 0)),
                       out_shape=jax.ShapeDtypeStruct((6, n_pad), jnp.int32),
                       interpret=True)(jnp.asarray(x))
  values, index = jax.lax.top_k(jnp.asarray(x.reshape(6, -1)), n)
  want = np.where(np.asarray(values) > -np.inf, index, -1)
  np.testing.assert_array_equal(got[:, :n], want)
  np.testing.assert_array_equal(got[:, n:], -1)
  assert (want >= 0).sum() > 40 and (want == -1).sum() >= n   # both kinds of slot
