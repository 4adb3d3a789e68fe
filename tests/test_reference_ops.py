"""The pure-JAX reference ops (impl="xla") against brute-force dense oracles.

Forward values must match the float64 NumPy oracle of tests/oracle.py to 1e-5
in float32; gradients pass `jax.test_util.check_grads` in float64.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import nsa_jax
from nsa_jax import NSAConfig
from tests import oracle, rand

SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=16,
                  num_selected=4, window=16)
# l = l' and no initial block, window not a power of two.
ODD = NSAConfig(compress_block=16, compress_stride=8, select_block=16,
                num_selected=3, num_initial=0, num_local=1, window=24)

# (B, T, HQ, HKV, Dk, Dv, config): T=1, T < l, T < l', T < w, T not a
# multiple of any block, G in {1, 2, 16}, Dk != Dv, batch 2.
SHAPES = [
    (1, 1, 2, 1, 16, 16, SMALL),
    (2, 5, 4, 2, 16, 8, SMALL),
    (1, 13, 2, 2, 8, 8, SMALL),
    (2, 77, 4, 2, 16, 8, SMALL),
    (1, 70, 16, 1, 8, 16, SMALL),
    (1, 61, 4, 4, 8, 12, ODD),
]


def make_inputs(key, B, T, HQ, HKV, Dk, Dv, cfg, dtype=jnp.float32):
  ks = rand.split(key, 8)
  Tc = cfg.num_compressed(T)
  n = lambda k, s: rand.normal(k, s, dtype)
  return dict(
      q=n(ks[0], (B, T, HQ, Dk)),
      k_cmp=n(ks[1], (B, Tc, HKV, Dk)), v_cmp=n(ks[2], (B, Tc, HKV, Dv)),
      k_slc=n(ks[3], (B, T, HKV, Dk)), v_slc=n(ks[4], (B, T, HKV, Dv)),
      k_win=n(ks[5], (B, T, HKV, Dk)), v_win=n(ks[6], (B, T, HKV, Dv)),
      gates=jax.nn.sigmoid(n(ks[7], (B, T, HQ, 3))))


def scale_of(x):
  return 1.0 / np.sqrt(x["q"].shape[-1])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_compressed_attention_matches_oracle(shape):
  *dims, cfg = shape
  x = make_inputs(rand.key(0), *dims, cfg)
  o, lse = jax.jit(functools.partial(nsa_jax.compressed_attention, config=cfg, impl="xla"))(
      x["q"], x["k_cmp"], x["v_cmp"])   # one compile, not one per primitive op by op
  B, T, _, HKV, _, _ = dims
  o_ref, lse_ref = oracle.dense_attention(
      x["q"], x["k_cmp"], x["v_cmp"], oracle.compressed_mask(B, T, HKV, cfg),
      scale_of(x))
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse_ref))
  fin = np.isfinite(lse_ref)
  np.testing.assert_allclose(np.asarray(lse)[fin], lse_ref[fin], rtol=1e-5, atol=1e-5)
  # Queries before the first complete block see nothing: zero output, -inf lse.
  early = min(T, cfg.compress_block - 1)
  assert np.all(np.asarray(o)[:, :early] == 0)
  assert np.all(np.asarray(lse)[:, :early] == -np.inf)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_window_attention_matches_oracle(shape):
  *dims, cfg = shape
  x = make_inputs(rand.key(1), *dims, cfg)
  o = jax.jit(functools.partial(nsa_jax.window_attention, config=cfg, impl="xla"))(
      x["q"], x["k_win"], x["v_win"])   # one compile, not one per primitive op by op
  B, T, _, HKV, _, _ = dims
  o_ref, _ = oracle.dense_attention(x["q"], x["k_win"], x["v_win"],
                                    oracle.window_mask(B, T, HKV, cfg), scale_of(x))
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_score", ["sum", "max"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_select_blocks_matches_oracle(shape, group_score):
  """Heads of a KV group summed (Eq. 10) or their max (config.group_score)."""
  *dims, cfg = shape
  cfg = dataclasses.replace(cfg, group_score=group_score)
  x = make_inputs(rand.key(2), *dims, cfg)
  idx = np.asarray(jax.jit(functools.partial(nsa_jax.select_blocks, config=cfg, impl="xla"))(
      x["q"], x["k_cmp"]))   # one compile, not one per primitive op by op
  want, scores = oracle.select_blocks(x["q"], x["k_cmp"], cfg, scale_of(x))
  B, T, HKV, n = idx.shape
  assert n == cfg.num_selected and idx.dtype == np.int32
  for b in range(B):
    for t in range(T):
      for g in range(HKV):
        got = idx[b, t, g]
        chosen = got[got >= 0]
        assert len(set(chosen)) == len(chosen), "duplicate block"
        assert np.all(got[len(chosen):] == -1) or np.all(np.sort(got)[: n - len(chosen)] == -1)
        assert len(chosen) == min(n, t // cfg.select_block + 1)
        if set(chosen) != want[b, t, g]:
          # Only a float near-tie may flip between equally scored blocks.
          diff = set(chosen) ^ want[b, t, g]
          s = scores[b, t, g, sorted(diff)]
          assert np.ptp(s) < 1e-6, (b, t, g, set(chosen), want[b, t, g])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_selected_attention_matches_oracle(shape):
  *dims, cfg = shape
  x = make_inputs(rand.key(3), *dims, cfg)

  @jax.jit   # both ops in one compile, not one per primitive op by op
  def run(q, k_cmp, k_slc, v_slc):
    idx = nsa_jax.select_blocks(q, k_cmp, config=cfg, impl="xla")
    return idx, nsa_jax.selected_attention(q, k_slc, v_slc, idx, config=cfg, impl="xla")
  idx, o = run(x["q"], x["k_cmp"], x["k_slc"], x["v_slc"])
  T = dims[1]
  o_ref, _ = oracle.dense_attention(x["q"], x["k_slc"], x["v_slc"],
                                    oracle.selected_mask(idx, T, cfg), scale_of(x))
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)


def test_selected_attention_ignores_slot_order_and_empty_slots():
  B, T, HQ, HKV, Dk, Dv = 1, 50, 4, 2, 16, 8
  x = make_inputs(rand.key(4), B, T, HQ, HKV, Dk, Dv, SMALL)
  idx = nsa_jax.select_blocks(x["q"], x["k_cmp"], config=SMALL, impl="xla")
  shuffled = jnp.flip(idx, axis=-1)
  f = jax.jit(lambda i: nsa_jax.selected_attention(x["q"], x["k_slc"], x["v_slc"], i,
                                                   config=SMALL, impl="xla"))
  np.testing.assert_allclose(f(idx), f(shuffled), rtol=1e-6, atol=1e-6)
  # Only -1 slots: nothing visible, zero output and no NaN.
  o = f(jnp.full_like(idx, -1))
  assert np.all(np.asarray(o) == 0)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nsa_matches_oracle(shape):
  *dims, cfg = shape
  x = make_inputs(rand.key(5), *dims, cfg)
  o, idx = jax.jit(functools.partial(nsa_jax.nsa, config=cfg, impl="xla",
                                      return_block_idx=True))(**x)   # one compile, not per op
  B, T, _, HKV, _, _ = dims
  sc = scale_of(x)
  o_cmp, _ = oracle.dense_attention(x["q"], x["k_cmp"], x["v_cmp"],
                                    oracle.compressed_mask(B, T, HKV, cfg), sc)
  o_slc, _ = oracle.dense_attention(x["q"], x["k_slc"], x["v_slc"],
                                    oracle.selected_mask(idx, T, cfg), sc)
  o_win, _ = oracle.dense_attention(x["q"], x["k_win"], x["v_win"],
                                    oracle.window_mask(B, T, HKV, cfg), sc)
  g = np.asarray(x["gates"], np.float64)[..., None]
  want = g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win
  np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)


GRAD_SHAPES = [(2, 37, 4, 2, 8, 4, SMALL), (1, 33, 16, 1, 4, 8, ODD)]
NAMES = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"]


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_gradients_float64(shape):
  *dims, cfg = shape
  x = make_inputs(rand.key(6), *dims, cfg, dtype=jnp.float64)
  kw = dict(config=cfg, impl="xla")

  @jax.jit
  def cmp(q, k, v):
    o, lse = nsa_jax.compressed_attention(q, k, v, **kw)
    return o, jnp.where(jnp.isfinite(lse), lse, 0.0)

  opts = dict(order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
  check_grads(cmp, (x["q"], x["k_cmp"], x["v_cmp"]), **opts)
  # The whole op covers the q/k/v gradients of every branch (each enters the
  # output through its gate) and the gates'. Selection is piecewise constant
  # in q and k_cmp, and the check's perturbations are too small to cross a tie.
  check_grads(jax.jit(lambda *a: nsa_jax.nsa(*a, **kw)), tuple(x[n] for n in NAMES), **opts)


def test_group_max_is_sum_for_one_head_per_group():
  """G = 1: the max over a group's one head is its score, as is the sum."""
  x = make_inputs(rand.key(12), 2, 77, 2, 2, 8, 8, SMALL)
  f = lambda group_score: jax.jit(lambda *a: nsa_jax.nsa(
      *a, config=dataclasses.replace(SMALL, group_score=group_score),
      impl="xla", return_block_idx=True))(*(x[n] for n in NAMES))
  for got, want in zip(f("max"), f("sum")):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("group_score", ["sum", "max"])
def test_straight_through_gate(group_score):
  """select_gate="straight_through" (docs/selection_learning.md#straight-through-gate): the
  forward pass is the paper's bit for bit; the gradients are those of a surrogate whose
  selected branch adds S(q, k_cmp) - S0 to each selected block's scores (S:
  `selected_scores`, S0 its value here, the selection held), checked numerically in
  float64; k_cmp gets a gradient through the selected branch only with the gate. And
  `selected_scores` on a slice of the queries (q_offset) gives those rows."""
  from nsa_jax.ops.selection import selected_scores
  cfg = dataclasses.replace(SMALL, group_score=group_score)
  gated = dataclasses.replace(cfg, select_gate="straight_through")
  x = make_inputs(rand.key(13), 2, 70, 4, 2, 8, 8, cfg, dtype=jnp.float64)
  x["gates"] = jnp.zeros_like(x["gates"]).at[..., 1].set(1.0)   # o = o_slc
  args = ("q", "k_cmp", "k_slc", "v_slc")

  @functools.cache   # one jitted function per config: its compiles are reused
  def op(config):
    def f(q, k_cmp, k_slc, v_slc):
      y = dict(x, q=q, k_cmp=k_cmp, k_slc=k_slc, v_slc=v_slc)
      return nsa_jax.nsa(*(y[n] for n in NAMES), config=config, impl="xla")
    return jax.jit(f)

  o, idx = jax.jit(lambda *a: nsa_jax.nsa(*a, config=gated, impl="xla",
                                           return_block_idx=True))(*(x[n] for n in NAMES))
  np.testing.assert_array_equal(o, op(cfg)(*(x[n] for n in args)))
  scores = lambda q, k_cmp: selected_scores(q, k_cmp, idx, config=gated, scale=scale_of(x))
  s0 = jax.jit(scores)(x["q"], x["k_cmp"])
  assert np.all(np.asarray(s0) >= 0) and np.asarray(s0).max() > 0

  @jax.jit
  def surrogate(q, k_cmp, k_slc, v_slc):
    return nsa_jax.selected_attention(q, k_slc, v_slc, idx, config=gated, impl="xla",
                                      block_bias=scores(q, k_cmp) - s0)

  ct = rand.normal(rand.key(14), o.shape, o.dtype)
  primals = tuple(x[n] for n in args)
  for config, reference in ((gated, surrogate), (cfg, None)):
    grads = jax.vjp(op(config), *primals)[1](ct)
    if reference is not None:
      for g, want in zip(grads, jax.vjp(reference, *primals)[1](ct)):
        np.testing.assert_allclose(g, want, rtol=1e-10, atol=1e-12)
    assert (np.abs(grads[1]).max() > 0) == (config is gated)
  check_grads(surrogate, primals, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
  t0 = 37
  part = selected_scores(x["q"][:, t0:], x["k_cmp"], idx[:, t0:], config=gated,
                         scale=scale_of(x), q_offset=jnp.int32(t0), query_chunk=16)
  np.testing.assert_allclose(part, s0[:, t0:], rtol=1e-12)


def test_gradients_finite_where_nothing_is_visible():
  x = make_inputs(rand.key(7), 1, 6, 2, 1, 8, 8, SMALL)   # T < l: Tc = 0
  loss = lambda *a: jnp.sum(nsa_jax.nsa(*a, config=SMALL, impl="xla") ** 2)
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(8))))(*(x[n] for n in NAMES))
  for n, g in zip(NAMES, grads):
    assert np.all(np.isfinite(np.asarray(g))), n
  x = make_inputs(rand.key(8), 1, 20, 2, 1, 8, 8, SMALL)  # rows t < l-1 see no block
  g = jax.jit(jax.grad(lambda q: jnp.sum(nsa_jax.compressed_attention(
      q, x["k_cmp"], x["v_cmp"], config=SMALL, impl="xla")[0])))(x["q"])
  assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[:, :7] == 0)


def test_bad_inputs_raise_value_errors_naming_the_argument():
  x = make_inputs(rand.key(9), 1, 40, 4, 2, 8, 8, SMALL)
  q, kc, vc, k, v = x["q"], x["k_cmp"], x["v_cmp"], x["k_slc"], x["v_slc"]
  kw = dict(config=SMALL, impl="xla")
  with pytest.raises(ValueError, match="q must have shape"):
    nsa_jax.window_attention(q[0], k, v, **kw)
  with pytest.raises(ValueError, match="HQ=4.*HKV=3"):
    nsa_jax.window_attention(q, jnp.zeros((1, 40, 3, 8), q.dtype), jnp.zeros((1, 40, 3, 8), q.dtype), **kw)
  with pytest.raises(ValueError, match="k.dtype=bfloat16"):
    nsa_jax.window_attention(q, k.astype(jnp.bfloat16), v, **kw)
  with pytest.raises(ValueError, match="k_cmp and v_cmp must have 9 time steps"):
    nsa_jax.compressed_attention(q, kc[:, :3], vc[:, :3], **kw)
  with pytest.raises(ValueError, match=r"k.shape\[-1\]=4"):
    nsa_jax.window_attention(q, k[..., :4], v, **kw)
  with pytest.raises(ValueError, match="block_idx.shape"):
    nsa_jax.selected_attention(q, k, v, jnp.zeros((1, 40, 2, 3), jnp.int32), **kw)
  with pytest.raises(ValueError, match="impl='cuda'"):
    nsa_jax.window_attention(q, k, v, config=SMALL, impl="cuda")
  with pytest.raises(ValueError, match="gates.shape"):
    nsa_jax.nsa(q, kc, vc, k, v, k, v, x["gates"][..., :2], **kw)
  with pytest.raises(ValueError, match="impl='cudnn'.* needs a GPU backend"):
    nsa_jax.window_attention(q, k, v, config=SMALL, impl="cudnn")
  with pytest.raises(ValueError, match="impl='cudnn' must be one of"):
    nsa_jax.nsa(q, kc, vc, k, v, k, v, x["gates"], config=SMALL, impl="cudnn")
  with pytest.raises(ValueError, match="config must be an NSAConfig"):
    nsa_jax.window_attention(q, k, v, config={"window": 4})


def test_cudnn_runs_only_what_it_takes(monkeypatch):
  """The rule of `cudnn.cudnn_runs`, with a GPU backend faked (no kernel runs
  here: the rule reads shapes, dtypes and the device only); which branch gets
  it is `nsa_jax.ops.dispatch`'s (tests/test_dispatch.py)."""
  from nsa_jax.ops import cudnn

  class Device:
    compute_capability = "8.0"

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda: [Device()])
  runs = cudnn.cudnn_runs
  q = jnp.zeros((1, 8, 4, 128), jnp.bfloat16)
  wide = jnp.zeros((1, 8, 4, 192), jnp.bfloat16)
  assert runs(q, q)
  assert runs(q.astype(jnp.float16), q.astype(jnp.float16))
  assert runs(q, q[..., :64])                                  # Dv < Dk: v padded
  assert not runs(q[..., :64], q)                              # Dv > Dk
  assert not runs(q[..., :60], q[..., :60])                    # Dk % 8 != 0
  assert not runs(q, q, interpret=True)
  assert not runs(q.astype(jnp.float32), q.astype(jnp.float32))
  assert not runs(wide, q)                                     # Dk > 128 before Hopper
  Device.compute_capability = "9.0"
  assert runs(wide, q)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert not runs(q, q)


@pytest.mark.parametrize("T,Dk,Dv", [(45, 16, 16), (38, 24, 16)])
def test_cudnn_window_call_matches_the_reference(cudnn_calls, T, Dk, Dv):
  """The cuDNN path's band (`local_window_size`), odd-T padding and v padding,
  run through jax's XLA implementation of the same call."""
  from nsa_jax.ops import cudnn, window
  x = make_inputs(rand.key(4), 2, T, 4, 2, Dk, Dv, SMALL)
  args = (x["q"], x["k_win"], x["v_win"])
  f = lambda *a: cudnn.cudnn_causal_attention(*a, scale=0.3, window=SMALL.window)[0]
  ref = lambda *a: window.window_attention_xla(*a, config=SMALL, scale=0.3)
  ct = rand.normal(rand.key(5), (2, T, 4, Dv), jnp.float32)
  # Both sides in one jitted program (one compile, not one per primitive op by op).
  both = jax.jit(lambda args, ct: [(o, vjp(ct)) for o, vjp in (jax.vjp(fn, *args)
                                                                for fn in (f, ref))])
  (o, grads), (o_ref, grads_ref) = both(args, ct)
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-6)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


# T: a multiple of d, T not a multiple of d (odd), T < l (no block), T = l
# (one block, two early residues), ceil(T/d) odd; G in {1, 2, 16}; Dv < Dk
# (cuDNN takes Dv <= Dk only).
@pytest.mark.parametrize("shape", [
    (2, 64, 4, 2, 16, 16, SMALL), (1, 77, 4, 2, 16, 8, SMALL),
    (1, 7, 2, 1, 8, 8, SMALL), (1, 8, 2, 2, 8, 8, SMALL),
    (1, 61, 16, 1, 16, 8, ODD), (1, 100, 4, 4, 16, 16, ODD)], ids=str)
def test_compressed_folded_by_residue_matches_the_reference(cudnn_calls, shape):
  """`compressed_attention_folded` (the cuDNN path: one causal attention per
  stride residue) against the reference, values, lse and gradients of o, with
  the attention call run through jax's XLA implementation."""
  from nsa_jax.ops import compressed
  *dims, cfg = shape
  x = make_inputs(rand.key(6), *dims, cfg)
  args = (x["q"], x["k_cmp"], x["v_cmp"])
  f = lambda *a: compressed.compressed_attention_folded(*a, config=cfg, scale=0.3)
  ref = lambda *a: compressed.compressed_attention_xla(*a, config=cfg, scale=0.3)
  B, T, HQ, _, _, Dv = dims
  ct = rand.normal(rand.key(7), (B, T, HQ, Dv), jnp.float32)

  @jax.jit   # both sides in one program (one compile, not one per primitive op by op)
  def both(args, ct):
    out = []
    for fn in (f, ref):
      o, vjp, lse = jax.vjp(fn, *args, has_aux=True)
      out.append((o, lse, vjp(ct)))
    return out
  (o, lse, grads), (o_ref, lse_ref, grads_ref) = both(args, ct)
  assert o.shape == ct.shape
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse_ref))
  fin = np.isfinite(np.asarray(lse_ref))
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(lse_ref)[fin], rtol=1e-5, atol=1e-6)
  for g, g_ref in zip(grads, grads_ref):
    # jax's XLA attention rounds logits to float32 even for float64 inputs, so
    # this runs in float32: dk, dv sum up to T terms, hence a tolerance scaled
    # by the largest gradient (a wrong index map is off by O(1) of it).
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5 * np.abs(g_ref).max(initial=0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(compress_block=24, compress_stride=16), "compress_stride=16 must divide compress_block=24"),
    (dict(select_block=40), "compress_stride=16 must divide select_block=40"),
    (dict(compress_block=128), "compress_block=128 must be <= select_block=64"),
    (dict(num_selected=2), "must be <= num_selected=2"),
    (dict(window=0), "window=0"),
    (dict(group_score="mean"), r"group_score='mean' must be one of \('sum', 'max'\)"),
    (dict(select_gate="soft"), r"select_gate='soft' must be one of \('none', 'straight_through'\)"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    NSAConfig(**kwargs)


def test_config_counts():
  cfg = NSAConfig()
  assert cfg.num_compressed(31) == 0 and cfg.num_compressed(32) == 1
  assert cfg.num_compressed(65536) == 4095
  assert cfg.num_select_blocks(65) == 2


def test_references_on_a_query_slice_give_those_rows():
  """`first`: the references on queries t0..t1-1 with all keys equal those rows
  of the whole, values and the key gradients of a cotangent on those rows only
  (gpu_check.py --matrix checks a 256k-token sequence's last rows this way)."""
  from nsa_jax.ops import compressed, selected, window
  B, T, HQ, HKV, Dk, Dv = 1, 77, 4, 2, 16, 8
  t0, t1 = 37, 77   # t0 inside a query chunk; t1 = T, not a multiple of the chunk
  x = make_inputs(rand.key(10), B, T, HQ, HKV, Dk, Dv, SMALL)
  idx = nsa_jax.select_blocks(x["q"], x["k_cmp"], config=SMALL, impl="xla")
  ct = rand.normal(rand.key(11), (B, T, HQ, Dv), jnp.float32)
  on_rows = (jnp.arange(T) >= t0) & (jnp.arange(T) < t1)
  kw = dict(config=SMALL, scale=0.3, query_chunk=8)
  refs = [(lambda q, k, v, i, first: compressed.compressed_attention_xla(
               q, k, v, **kw, first=first)[0], ("k_cmp", "v_cmp")),
          (lambda q, k, v, i, first: selected.selected_attention_xla(
               q, k, v, i, **kw, first=first), ("k_slc", "v_slc")),
          (lambda q, k, v, i, first: window.window_attention_xla(
               q, k, v, **kw, first=first), ("k_win", "v_win"))]

  @jax.jit   # every reference, whole and on the rows, in one program (one compile)
  def run(x, idx, ct):
    out = []
    for ref, keys in refs:
      k, v = x[keys[0]], x[keys[1]]
      whole, vjp = jax.vjp(lambda k, v: ref(x["q"], k, v, idx, 0), k, v)
      part, vjp_part = jax.vjp(lambda k, v: ref(x["q"][:, t0:t1], k, v, idx[:, t0:t1], t0),
                               k, v)
      out.append((whole, part, vjp(ct * on_rows[None, :, None, None]),
                  vjp_part(ct[:, t0:t1])))
    return out
  for whole, part, grads, grads_part in run(x, idx, ct):
    np.testing.assert_allclose(part, whole[:, t0:t1], rtol=1e-6, atol=1e-6)
    for g_part, g in zip(grads_part, grads):
      np.testing.assert_allclose(g_part, g, rtol=1e-5, atol=1e-6)


def _largest_intermediate(jaxpr):
  sizes = [0]
  for eqn in jaxpr.eqns:
    sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)          # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          sizes.append(_largest_intermediate(sub))
  return max(sizes)


def test_memory_is_subquadratic():
  """The references never build a [T, T]-sized array (checked on the jaxpr)."""
  T, cfg = 4096, NSAConfig()
  x = jax.eval_shape(lambda: make_inputs(rand.key(0), 1, T, 2, 1, 16, 16, cfg))
  idx = jax.ShapeDtypeStruct((1, T, 1, cfg.num_selected), jnp.int32)
  kw = dict(config=cfg, impl="xla")
  cases = [
      (lambda q, k, v: nsa_jax.window_attention(q, k, v, **kw), (x["q"], x["k_win"], x["v_win"])),
      (lambda q, k, v, i: nsa_jax.selected_attention(q, k, v, i, **kw), (x["q"], x["k_slc"], x["v_slc"], idx)),
      (lambda q, k: nsa_jax.select_blocks(q, k, **kw), (x["q"], x["k_cmp"])),
  ]
  for fn, args in cases:
    biggest = _largest_intermediate(jax.make_jaxpr(fn)(*args).jaxpr)
    assert biggest < T * T / 4, biggest
