"""Selected-attention Pallas kernels (pallas_kernels/selected_attention/) vs their reference.

Interpret mode on the CPU, float32: forward output and the q, k, v gradients
(jax.vjp with a random cotangent) against `selected_attention_xla`. Each case
compiles once (interpret-mode compiles dominate the run time), so the cases
pile several edge conditions each.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import NSAConfig
from nsa_jax.ops.selected import selected_attention_xla
from pallas_kernels.selected_attention import choice, plan, wrapper
from pallas_kernels.selected_attention import selected_attention
from pallas_kernels.selected_attention.choice import tiling
from pallas_kernels.selected_attention.plan import entry_index, listed, pad_blk
from pallas_kernels.selected_attention.tiles import Tiles, default_tiles
from tests import rand

SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=16,
                  num_selected=4, window=16)
# l' = 8 < 16 keys per load, n = 3 not a power of two.
TINY_BLOCKS = NSAConfig(compress_block=4, compress_stride=4, select_block=8,
                        num_selected=3, window=8)
RTOL = ATOL = 1e-4   # float32, same math in a different summation order


def _inputs(key, B, T, HKV, G, Dk, Dv):
  kq, kk, kv, kc, kg = rand.split(key, 5)
  q = rand.normal(kq, (B, T, HKV * G, Dk), jnp.float32)
  k = rand.normal(kk, (B, T, HKV, Dk), jnp.float32)
  v = rand.normal(kv, (B, T, HKV, Dv), jnp.float32)
  ct = rand.normal(kg, (B, T, HKV * G, Dv), jnp.float32)
  return q, k, v, ct, kc


def _random_block_idx(key, B, T, HKV, config, empty_frac):
  """Distinct random block indices in shuffled slot order, some slots -1."""
  n, nb = config.num_selected, config.num_select_blocks(T)
  k1, k2 = rand.split(key)
  idx = jnp.argsort(rand.uniform(k1, (B, T, HKV, max(n, nb))), axis=-1)[..., :n]
  idx = jnp.where(idx < nb, idx, -1)
  drop = rand.uniform(k2, idx.shape) < empty_frac
  return jnp.where(drop, -1, idx).astype(jnp.int32)


def _selected_block_idx(key, q, HKV, config):
  """block_idx from the reference top-n selection on random compressed keys."""
  B, T, _, Dk = q.shape
  k_cmp = rand.normal(key, (B, config.num_compressed(T), HKV, Dk), jnp.float32)
  return nsa_jax.select_blocks(q, k_cmp, config=config, impl="xla")


@functools.partial(jax.jit, static_argnames=("config", "scale", "first"))
def _reference(q, k, v, block_idx, ct, *, config, scale, first=0):
  """The reference's output and its q, k, v gradients under cotangent ct (one
  compile per shape, shared by the tests)."""
  o, vjp = jax.vjp(lambda *a: selected_attention_xla(*a, block_idx, config=config, scale=scale,
                                                     first=first), q, k, v)
  return o, vjp(ct)


def _check(kernel_fn, q, k, v, block_idx, ct, config, first=0):
  """first: position of q's row 0 among the keys (q a slice of the queries)."""
  scale = q.shape[-1] ** -0.5

  def run(q, k, v):
    o, vjp = jax.vjp(lambda *a: kernel_fn(*a, block_idx, scale), q, k, v)
    return o, vjp(ct)

  o, grads = jax.jit(run)(q, k, v)
  o_ref, grads_ref = _reference(q, k, v, block_idx, ct, config=config, scale=scale, first=first)
  assert o.shape == o_ref.shape and o.dtype == q.dtype
  np.testing.assert_allclose(o, o_ref, rtol=RTOL, atol=ATOL)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert np.isfinite(np.asarray(g)).all(), name
    np.testing.assert_allclose(g, g_ref, rtol=RTOL, atol=ATOL, err_msg=f"d{name}")
  return o


def _kernel(config, tiles):
  return lambda q, k, v, b, scale: selected_attention(
      q, k, v, b, block=config.select_block, scale=scale, interpret=True, tiles=tiles)


def test_random_indices_odd_length_chunked_dkv():
  """T=77 (no multiple of a tile or block), G=2, Dk != Dv, B=2, -1 slots,
  some tokens with no block at all; dK/dV split into chunks of 2 tiles, each
  step gathering up to 8 tiles (dkv_rows = 128 of 16-row tiles): steps only
  partly filled."""
  B, T, HKV, G = 2, 77, 2, 2
  q, k, v, ct, kc = _inputs(rand.key(0), B, T, HKV, G, 32, 16)
  block_idx = _random_block_idx(kc, B, T, HKV, SMALL, empty_frac=0.25)
  block_idx = block_idx.at[:, 40:43].set(-1)       # these rows see nothing
  o = _check(_kernel(SMALL, Tiles(rows=16, dkv_tiles=2, block_major=False)), q, k, v, block_idx,
             ct, SMALL)
  assert bool(jnp.all(o[:, 40:43] == 0))


def test_selected_indices_group16_deterministic_dkv():
  """T=130, G=16 (4 tokens per 64-row tile), block_idx from select_blocks,
  one dK/dV program per block."""
  B, T, HKV, G = 1, 130, 2, 16
  q, k, v, ct, kc = _inputs(rand.key(1), B, T, HKV, G, 16, 16)
  block_idx = _selected_block_idx(kc, q, HKV, SMALL)
  _check(_kernel(SMALL, Tiles(rows=64, dkv_tiles=None)), q, k, v, block_idx, ct, SMALL)


def test_small_blocks_odd_group_and_dims():
  """l' = 8 (blocks padded to 16-key loads), n = 3, G = 3, Dk = 24, Dv = 40:
  every padding path of the wrapper."""
  B, T, HKV, G = 1, 45, 1, 3
  q, k, v, ct, kc = _inputs(rand.key(2), B, T, HKV, G, 24, 40)
  block_idx = _random_block_idx(kc, B, T, HKV, TINY_BLOCKS, empty_frac=0.1)
  _check(_kernel(TINY_BLOCKS, Tiles(rows=16, dkv_tiles=3, block_major=False)), q, k, v,
         block_idx, ct, TINY_BLOCKS)


@pytest.mark.parametrize("block_major", [False, True])
def test_query_slice_at_a_traced_offset(block_major):
  """Rows q0 .. q0 + 26 of T = 72 queries against all 72 keys, q0 = 27 traced (as under
  shard_map for context parallelism; no multiple of a tile or block): the reference's
  rows, forward and the gradients of the slice and of every key, in either tiling."""
  B, T, HKV, G, q0, Tl = 2, 72, 2, 2, 27, 27
  q, k, v, ct, kc = _inputs(rand.key(6), B, T, HKV, G, 32, 16)
  rows = slice(q0, q0 + Tl)
  block_idx = _selected_block_idx(kc, q, HKV, SMALL)[:, rows]
  at_offset = jax.jit(lambda q, k, v, b, offset, scale: selected_attention(
      q, k, v, b, block=SMALL.select_block, scale=scale, interpret=True,
      tiles=Tiles(block_major=block_major), q_offset=offset), static_argnums=5)
  _check(lambda q, k, v, b, scale: at_offset(q, k, v, b, jnp.int32(q0), scale),
         q[:, rows], k, v, block_idx, ct[:, rows], SMALL, first=q0)


def _tiling(q, v, block_idx, tiles):
  return tiling(q, v, block_idx, SMALL.select_block, 0.25, True, tiles)


def _shapes(T, HKV, G, dtype=jnp.bfloat16, B=1, D=128):
  x = lambda *s, d=dtype: jax.ShapeDtypeStruct(s, d)
  return x(B, T, HKV * G, D), x(B, T, HKV, D), x(B, T, HKV, SMALL.num_selected, d=jnp.int32)


@pytest.mark.parametrize("G", [1, 2, 3, 4, 8, 16])
def test_tiling_is_fixed_by_the_group_size(G):
  """Default tiles: block-major for G <= 8, narrow query tiles (16 rows: one token
  at G = 16) above, whatever block_idx holds (only the shapes are known);
  Tiles.block_major forces either, Tiles.rows sets the query tile's width."""
  q, v, block_idx = _shapes(4096, 2, G)
  geo = _tiling(q, v, block_idx, Tiles())
  assert geo.tiles.block_major == (G <= 8)
  if G > 8:
    assert geo.Bq == 1
  assert _tiling(q, v, block_idx, Tiles(block_major=True)).tiles.block_major
  query = _tiling(q, v, block_idx, Tiles(block_major=False, rows=64))
  assert not query.tiles.block_major and query.M == max(64, geo.Gp)


def _pallas_calls(jaxpr) -> list[str]:
  """Names of the pallas_calls in a jaxpr, its sub-jaxprs included."""
  names = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      names.append(eqn.params["name"])
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          names += _pallas_calls(sub)
  return names


@pytest.mark.parametrize("G,kernels", [
    (4, ["nsa_selected_block_fwd", "nsa_selected_dkv"]),
    (16, ["nsa_selected_fwd", "nsa_selected_dq", "nsa_selected_dkv"])])
def test_forward_and_backward_compile_one_tiling(G, kernels):
  """Forward and backward trace the kernels of the one tiling that runs (block-major
  at G = 4, narrow query tiles at G = 16), no others: nothing chosen per call."""
  q, v, block_idx = _shapes(256, 2, G, jnp.float32, D=16)
  loss = lambda q, k, v, b: jnp.sum(_kernel(SMALL, None)(q, k, v, b, 0.25))
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, v, v, block_idx)
  assert sorted(_pallas_calls(jaxpr.jaxpr)) == sorted(kernels)


@pytest.mark.parametrize("B,T,HKV,G,Dk,Dv,config,tiles", [
    # block_entries=3 and 16-row steps: chunks and steps end part-filled.
    pytest.param(2, 77, 2, 2, 32, 16, SMALL,
                 Tiles(block_major=True, block_rows=16, block_entries=3, dkv_rows=16),
                 id="T77-G2-DkneDv"),
    pytest.param(1, 45, 1, 3, 24, 40, TINY_BLOCKS,
                 Tiles(block_major=True, block_rows=32, block_entries=5),
                 id="lp8-G3-Dk24-Dv40"),
    # dkv_tiles=None: one dK/dV program per block (the deterministic mode).
    pytest.param(1, 130, 2, 16, 16, 16, SMALL, Tiles(block_major=True, dkv_tiles=None),
                 id="T130-G16-one-program-per-block"),
    pytest.param(1, 61, 2, 1, 16, 32, SMALL, Tiles(block_major=True, block_entries=4),
                 id="T61-G1"),
])
def test_block_major(B, T, HKV, G, Dk, Dv, config, tiles):
  """The block-major forward (per-entry results merged in XLA) and backward
  (dK/dV over entries, dQ terms summed in XLA) against the reference: odd T,
  G in {1, 2, 3, 16}, Dk != Dv, l' = 8, -1 slots, rows that see nothing."""
  q, k, v, ct, kc = _inputs(rand.key(5), B, T, HKV, G, Dk, Dv)
  block_idx = _random_block_idx(kc, B, T, HKV, config, empty_frac=0.25)
  block_idx = block_idx.at[:, 3:5].set(-1)       # these rows see nothing
  o = _check(_kernel(config, tiles), q, k, v, block_idx, ct, config)
  assert bool(jnp.all(o[:, 3:5] == 0))


def test_block_major_deterministic_mode_runs_one_program_per_block(monkeypatch):
  """With dkv_tiles=None the block-major backward asks for, and gets, one work
  item per KV block (each dK/dV element then receives a single atomic add:
  bitwise reproducible on the GPU); by default it reuses the forward's index,
  chunks of at most block_entries."""
  B, T, HKV, G = 1, 300, 2, 4
  q, k, v, ct, kc = _inputs(rand.key(6), B, T, HKV, G, 16, 16)
  block_idx = _random_block_idx(kc, B, T, HKV, SMALL, empty_frac=0.1)
  chunks = []
  index = plan.entry_index
  record = lambda blk, geo, chunk: chunks.append(chunk) or index(blk, geo, chunk)
  for module in (plan, wrapper):    # the forward's plan, the backward
    monkeypatch.setattr(module, "entry_index", record)
  for dkv_tiles in (None, 256):
    loss = lambda q: jnp.sum(_kernel(SMALL, Tiles(block_major=True, block_entries=9,
                                                  dkv_tiles=dkv_tiles))(q, k, v, block_idx, 0.25))
    jax.make_jaxpr(jax.grad(loss))(q)      # traced only: forward, then backward
  assert chunks == [9, None, 9]
  geo = _tiling(q, v, block_idx, Tiles(block_major=True))
  blk = pad_blk(block_idx, jnp.zeros(1, jnp.int32), geo)
  for chunk in (None, 7):
    entries, items = entry_index(blk, geo, chunk)
    lengths = items[..., 2] - items[..., 1]
    for h in range(HKV):
      entries = np.asarray(listed(blk)[0, :, h])
      per_block = np.bincount(np.asarray(blk[0, :, h])[entries], minlength=geo.nb)
      used = np.asarray(lengths[0, h]) > 0
      got = np.bincount(np.asarray(items[0, h, :, 0])[used],
                        weights=np.asarray(lengths[0, h])[used], minlength=geo.nb)
      np.testing.assert_array_equal(got, per_block)          # every entry, once
      if chunk is None:
        assert used.sum() == (per_block > 0).sum()           # one item per block
      else:
        assert np.asarray(lengths).max() <= chunk and used.sum() > (per_block > 0).sum()


def test_block_major_runs_in_passes_of_batch_rows_and_heads():
  """Tiles.block_pass_bytes caps block-major's transient buffers (n x the output and
  lse, n x dQ; `block_major_bytes`) per pass: the (batch row, KV head) units run in
  passes of as many as fit, at least one, evenly spread (the last pass padded); output
  and gradients are the reference's, at a query offset too."""
  B, T, HKV, G = 3, 77, 3, 2
  q, v, block_idx = _shapes(T, HKV, G, jnp.float32, B=B, D=16)
  tiles = lambda cap: Tiles(block_major=True, block_pass_bytes=cap)
  whole = _tiling(q, v, block_idx, tiles(1 << 30))
  unit = choice.block_major_bytes(dataclasses.replace(whole, B=1, HKV=1), q.dtype)
  # Per (entry, head) row: the forward's float32 output and lse (the dQ term is smaller).
  assert unit == whole.Tq * whole.n_pad * whole.Gp * (16 * 4 + 4)
  assert (whole.B, whole.HKV) == (B, HKV)                 # one pass
  for cap, units in ((9 * unit, (3, 3)), (8 * unit, (5, 1)), (4 * unit, (3, 1)),
                     (2 * unit, (2, 1)), (unit, (1, 1)), (1, (1, 1))):
    geo = _tiling(q, v, block_idx, tiles(cap))
    assert (geo.B, geo.HKV, geo.T) == units + (T,)
  # Dk = 32 != Dv: 128 bytes a row (the dQ term), so 4 x unit holds 2 units.
  q, k, v, ct, kc = _inputs(rand.key(7), B, T, HKV, G, 32, 16)
  block_idx = _random_block_idx(kc, B, T, HKV, SMALL, empty_frac=0.25)
  assert _tiling(q, v, block_idx, tiles(4 * unit)).B == 2
  assert _tiling(q[:, :40], v, block_idx[:, :40], tiles(8 * unit)).B == 5
  _check(_kernel(SMALL, tiles(4 * unit)), q, k, v, block_idx, ct, SMALL)   # 5 passes, 1 padded
  q0, Tl = 21, 40
  at_offset = lambda q, k, v, b, scale: selected_attention(
      q, k, v, b, block=SMALL.select_block, scale=scale, interpret=True, tiles=tiles(8 * unit),
      q_offset=jnp.int32(q0))                                              # 2 passes of 5
  _check(at_offset, q[:, q0:q0 + Tl], k, v, block_idx[:, q0:q0 + Tl], ct[:, q0:q0 + Tl], SMALL,
         first=q0)


@pytest.mark.parametrize("B,T,HKV,G,Dk,Dv,config,tiles,q0", [
    pytest.param(2, 77, 2, 1, 32, 16, SMALL, Tiles(block_pass_bytes=1, block_entries=3), 0,
                 id="T77-G1-DkneDv-passes"),
    pytest.param(1, 45, 1, 3, 24, 40, TINY_BLOCKS, Tiles(block_rows=32, dkv_rows=32), 0,
                 id="lp8-G3-Dk24-Dv40"),
    # Default tiles would pick query tiles at G = 16: a bias runs block-major anyway.
    pytest.param(1, 70, 2, 16, 16, 16, SMALL, None, 0, id="T70-G16"),
    pytest.param(2, 72, 2, 2, 32, 16, SMALL, None, 27, id="slice-at-offset-27"),
])
def test_block_bias(B, T, HKV, G, Dk, Dv, config, tiles, q0):
  """A score bias per slot (the straight-through gate; docs/selection_learning.md): the
  output and the gradients of q, k, v and the bias against the reference's, which adds
  the bias to the scores of each slot's keys; odd T, G in {1, 3, 16}, Dk != Dv, l' = 8,
  -1 slots, rows that see nothing, passes, a query slice at an offset."""
  q, k, v, ct, kc = _inputs(rand.key(8), B, q0 + T, HKV, G, Dk, Dv)
  block_idx = _random_block_idx(kc, B, q0 + T, HKV, config, empty_frac=0.25)
  block_idx = block_idx.at[:, q0 + 3:q0 + 5].set(-1)        # these rows see nothing
  rows = slice(q0, q0 + T)
  q, ct, block_idx = q[:, rows], ct[:, rows], block_idx[:, rows]
  bias = 2.0 * rand.normal(rand.key(9), block_idx.shape, jnp.float32)
  scale = Dk ** -0.5
  kernel = jax.jit(lambda q, k, v, b: selected_attention(
      q, k, v, block_idx, block=config.select_block, scale=scale, interpret=True,
      tiles=tiles, q_offset=jnp.int32(q0) if q0 else None, block_bias=b))
  reference = jax.jit(lambda q, k, v, b: selected_attention_xla(
      q, k, v, block_idx, config=config, scale=scale, first=q0, block_bias=b))
  (o, vjp), (o_ref, vjp_ref) = (jax.vjp(f, q, k, v, bias) for f in (kernel, reference))
  np.testing.assert_allclose(o, o_ref, rtol=RTOL, atol=ATOL)
  assert bool(jnp.all(o[:, 3:5] == 0))
  for name, g, g_ref in zip(("q", "k", "v", "bias"), vjp(ct), vjp_ref(ct)):
    assert np.isfinite(np.asarray(g)).all(), name
    np.testing.assert_allclose(g, g_ref, rtol=RTOL, atol=ATOL, err_msg=f"d{name}")
  assert float(jnp.max(jnp.abs(vjp(ct)[3]))) > 0


def test_public_op_shorter_than_a_block():
  """T = 5 < l', G = 1, through nsa_jax.selected_attention(impl="pallas")
  (default tiles: block-major at G = 1)."""
  B, T, HKV, G = 2, 5, 2, 1
  q, k, v, ct, kc = _inputs(rand.key(3), B, T, HKV, G, 16, 32)
  block_idx = _selected_block_idx(kc, q, HKV, SMALL)
  assert bool(jnp.all(block_idx[..., 0] == 0)) and bool(jnp.all(block_idx[..., 1:] == -1))
  _check(lambda q, k, v, b, scale: nsa_jax.selected_attention(
      q, k, v, b, config=SMALL, impl="pallas", interpret=True),
      q, k, v, block_idx, ct, SMALL)


def test_tiles_validation():
  with pytest.raises(ValueError, match="rows=24"):
    Tiles(rows=24)
  with pytest.raises(ValueError, match="dkv_tiles=0"):
    Tiles(dkv_tiles=0)
  with pytest.raises(ValueError, match="block_dq_float32=None"):
    Tiles(block_dq_float32=None)
  with pytest.raises(ValueError, match="dkv_rows=48"):
    Tiles(dkv_rows=48)
  with pytest.raises(ValueError, match="block_rows=24"):
    Tiles(block_rows=24)
  with pytest.raises(ValueError, match="block_entries=0"):
    Tiles(block_entries=0)
  with pytest.raises(ValueError, match="block_major='yes'"):
    Tiles(block_major="yes")


def test_default_tiles_one_warp_only_where_measured():
  """One warp for the narrow tile only with 16-bit inputs and heads <= 128 wide
  (faster there on an H200; Config B's 192-wide heads were slower on it), and
  float32's smaller dK/dV steps and single-stage wide-head loads."""
  x = lambda D, dtype=jnp.bfloat16: jax.ShapeDtypeStruct((1, 64, 4, D), dtype)
  assert default_tiles(x(128), x(128)) == Tiles() and Tiles().num_warps == 1
  assert default_tiles(x(192), x(128)) == Tiles(num_warps=2)
  assert default_tiles(x(128, jnp.float32), x(128, jnp.float32)) == Tiles(
      dkv_rows=64, num_warps=2, num_stages=2)
  assert default_tiles(x(64, jnp.float32), x(192, jnp.float32)).num_stages == 1


@pytest.mark.parametrize("dq_float32", [False, True])
def test_block_major_bf16_dq_terms(dq_float32):
  """bf16 inputs, block-major: each entry's dQ term stored in bf16 (the default) or
  float32 (`Tiles.block_dq_float32`), the n terms summed in float32. Forward and
  gradients against the float32 reference on the same (bf16-rounded) inputs: max
  |diff| / max |ref| within 1e-2, a few bf16 roundings (2^-8 = 3.9e-3; the GPU
  check allows 2e-2). T = 77, G = 2, Dk != Dv, -1 slots."""
  B, T, HKV, G = 2, 77, 2, 2
  q, k, v, ct, kc = _inputs(rand.key(9), B, T, HKV, G, 32, 16)
  q, k, v, ct = (x.astype(jnp.bfloat16) for x in (q, k, v, ct))
  block_idx = _random_block_idx(kc, B, T, HKV, SMALL, empty_frac=0.25)
  tiles = Tiles(block_major=True, block_rows=16, block_entries=3, dkv_rows=16,
                block_dq_float32=dq_float32)

  def run(fn, *args):
    o, vjp = jax.vjp(fn, *args)
    return (o, *vjp(ct.astype(o.dtype)))

  got = jax.jit(lambda *a: run(lambda *x: _kernel(SMALL, tiles)(*x, block_idx, 0.25), *a))(q, k, v)
  q32, k32, v32, ct32 = (x.astype(jnp.float32) for x in (q, k, v, ct))
  o_ref, grads_ref = _reference(q32, k32, v32, block_idx, ct32, config=SMALL, scale=0.25)
  want = (o_ref, *grads_ref)
  for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
    assert g.dtype == jnp.bfloat16, name
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.abs(g - w).max() / np.abs(w).max() <= 1e-2, name


def test_straight_through_gate_through_nsa_on_the_kernels():
  """nsa with select_gate="straight_through" on impl="pallas" (interpret mode; the selected
  branch takes the gate's bias on the kernels) gives the reference's output and the
  gradients of every input, k_cmp's through the gate included (float32, G = 2, T = 70)."""
  B, T, HQ, HKV, Dk, Dv = 1, 70, 4, 2, 16, 8
  config = dataclasses.replace(SMALL, select_gate="straight_through")
  ks = rand.split(rand.key(10), 9)
  x = lambda i, S, H, D: rand.normal(ks[i], (B, S, H, D), jnp.float32)
  Tc = config.num_compressed(T)
  args = (x(0, T, HQ, Dk), x(1, Tc, HKV, Dk), x(2, Tc, HKV, Dv), x(3, T, HKV, Dk),
          x(4, T, HKV, Dv), x(5, T, HKV, Dk), x(6, T, HKV, Dv),
          jax.nn.sigmoid(x(7, T, HQ, 3)))
  ct = x(8, T, HQ, Dv)

  def run(impl):
    f = lambda *a: nsa_jax.nsa(*a, config=config, impl=impl, interpret=True)
    o, vjp = jax.vjp(f, *args)
    return o, vjp(ct)

  (o, grads), (o_ref, grads_ref) = jax.jit(lambda: run("pallas"))(), jax.jit(lambda: run("xla"))()
  np.testing.assert_allclose(o, o_ref, rtol=RTOL, atol=ATOL)
  for name, g, g_ref in zip(("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win",
                             "gates"), grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=RTOL, atol=ATOL, err_msg=f"d{name}")
  # Without the gate, dk_cmp is another (on the reference, which the kernels match).
  plain = jax.jit(lambda: jax.vjp(lambda k_cmp: nsa_jax.nsa(
      args[0], k_cmp, *args[2:], config=SMALL, impl="xla"), args[1])[1](ct)[0])()
  assert float(jnp.max(jnp.abs(grads[1] - plain))) > 1e-3   # the gate's path into k_cmp
