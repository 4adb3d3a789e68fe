"""The dispatch table of nsa_jax.ops (nsa_jax/ops/dispatch.py): which backend runs a call.

A GPU backend is faked where the rule needs one; nothing is compiled for it: the
checks read shapes, dtypes, the config and the device only.
"""
import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import nsa_jax
from nsa_jax import NSAConfig
from nsa_jax.model import ModelConfig, Transformer
from nsa_jax.ops import dispatch, segments
from nsa_jax.ops.dense import TOKEN_BLOCKS, dense_attention
from nsa_jax.ops.nsa import backends
from tests import rand

SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=16,
                  num_selected=4, window=16)


class Hopper:
  platform = "gpu"
  compute_capability = "9.0"


@pytest.fixture
def fake_gpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda: [Hopper()])


def _branch_calls(dtype, Dk=128, Dv=128, interpret=None, T=64, HQ=4, HKV=2, packed=False,
                  offset=False):
  x = lambda H, D, S=T: jax.ShapeDtypeStruct((1, S, H, D), dtype)
  Tc = SMALL.num_compressed(T)
  call = lambda **arrays: dispatch.Call(arrays, SMALL, interpret, packed, offset)
  return {"compressed_attention": call(q=x(HQ, Dk), k_cmp=x(HKV, Dk, Tc), v_cmp=x(HKV, Dv, Tc)),
          "select_blocks": call(q=x(HQ, Dk), k_cmp=x(HKV, Dk, Tc)),
          "selected_attention": call(q=x(HQ, Dk), k=x(HKV, Dk), v=x(HKV, Dv)),
          "window_attention": call(q=x(HQ, Dk), k=x(HKV, Dk), v=x(HKV, Dv))}


def test_nsa_branches_on_a_gpu(fake_gpu):
  """nsa's window and compressed branches go to cuDNN where it takes the inputs
  (16-bit, "auto" and "pallas"), the rest to the kernels; "xla" stays the reference;
  interpret mode keeps cuDNN out."""
  pallas = {"select_blocks": "pallas", "selected_attention": "pallas"}
  on_cudnn = {"compressed_attention": "cudnn", "window_attention": "cudnn", **pallas}
  for impl in ("auto", "pallas"):
    assert dispatch.nsa_branches(impl, _branch_calls(jnp.bfloat16)) == on_cudnn
  assert set(dispatch.nsa_branches("xla", _branch_calls(jnp.bfloat16)).values()) == {"xla"}
  kernels = dispatch.nsa_branches("pallas", _branch_calls(jnp.bfloat16, interpret=True))
  assert set(kernels.values()) == {"pallas"}
  f32 = dispatch.nsa_branches("auto", _branch_calls(jnp.float32))
  assert set(f32.values()) == {"pallas"}                      # cuDNN takes 16-bit only


@pytest.mark.parametrize("flag, reason", [
    ("packed", r"segment_ids: cudnn: segment_ids \(packed rows\)"),
    ("offset", r"q_offset: cudnn: a query offset \(context parallelism\)")])
def test_packed_rows_and_query_offsets_run_on_the_kernels(fake_gpu, flag, reason):
  """Packed rows (segment ids) and query offsets (context parallelism): every branch on
  the Pallas kernels, cuDNN refused with the reason (it takes no document mask and no
  query offset here)."""
  calls = _branch_calls(jnp.bfloat16, **{flag: True})
  for impl in ("auto", "pallas"):
    assert set(dispatch.nsa_branches(impl, calls).values()) == {"pallas"}
  with pytest.raises(ValueError, match=r"window_attention\(impl='cudnn'\) cannot run .*, "
                                       + reason):
    dispatch.choose("window_attention", "cudnn", calls["window_attention"])


def test_auto_falls_back_and_explicit_impls_raise(fake_gpu):
  """Inputs no kernel takes (float64): "auto" runs the reference, "pallas" raises a
  ValueError that names the op, the sizes and why, before anything is traced."""
  calls = _branch_calls(jnp.float64)
  assert set(dispatch.nsa_branches("auto", calls).values()) == {"xla"}
  with pytest.raises(ValueError, match=r"selected_attention\(impl='pallas'\) cannot run "
                                       r"q \[1, 64, 4, 128\] float64.*float64 is not"):
    dispatch.choose("selected_attention", "pallas", calls["selected_attention"])
  with pytest.raises(ValueError, match="cudnn: cuDNN's fused attention needs"):
    dispatch.nsa_branches("pallas", calls)


def test_straight_through_gate_runs_the_selected_branch_on_the_kernels(fake_gpu):
  """select_gate="straight_through" gives the selected branch a block bias, which the
  kernels' block-major tiling takes: every branch runs where it runs without the gate,
  at G = 16 too (where block-major is not the default tiling)."""
  gated = dataclasses.replace(SMALL, select_gate="straight_through")
  x = lambda H, S=64: jax.ShapeDtypeStruct((1, S, H, 128), jnp.bfloat16)
  kv = lambda S=64: (x(2, S), x(2, S))
  for HQ in (4, 32):
    arrays = (x(HQ), *kv(SMALL.num_compressed(64)), *kv(), *kv())
    plain = backends(*arrays, config=SMALL, impl="auto")
    assert plain["selected_attention"] == "pallas"
    for impl in ("auto", "pallas"):
      assert backends(*arrays, config=gated, impl=impl)["selected_attention"] == "pallas"
    assert backends(*arrays, config=gated, impl="auto") == plain


def test_auto_is_the_reference_off_a_gpu():
  """On the CPU "auto" runs the reference, also when interpret mode is asked for;
  "pallas" runs the kernels in interpret mode unless interpret=False."""
  calls = _branch_calls(jnp.float32, interpret=True)
  assert set(dispatch.nsa_branches("auto", calls).values()) == {"xla"}
  assert dispatch.choose("window_attention", "auto", calls["window_attention"]) == "xla"
  assert dispatch.choose("window_attention", "pallas", calls["window_attention"]) == "pallas"
  compiled = _branch_calls(jnp.float32, interpret=False)["window_attention"]
  with pytest.raises(ValueError, match="need a GPU backend"):
    dispatch.choose("window_attention", "pallas", compiled)


def test_the_standalone_compressed_op_keeps_its_lse_gradient(fake_gpu):
  """compressed_attention(impl="auto") never picks cuDNN, whose lse carries no
  gradient; asked for explicitly, cuDNN runs it."""
  call = _branch_calls(jnp.bfloat16)["compressed_attention"]
  assert dispatch.choose("compressed_attention", "auto", call) == "pallas"
  assert dispatch.choose("compressed_attention", "cudnn", call) == "cudnn"


def test_ops_raise_for_unknown_impls():
  q = jnp.zeros((1, 40, 4, 8), jnp.float32)
  k = jnp.zeros((1, 40, 2, 8), jnp.float32)
  with pytest.raises(ValueError, match=r"impl='cudnn' must be one of \('auto', 'pallas', 'xla'\)"):
    nsa_jax.selected_attention(q, k, k, jnp.zeros((1, 40, 2, 4), jnp.int32), config=SMALL,
                               impl="cudnn")


def _dense_call(dtype, D=64, interpret=None, packed=False):
  x = lambda H: jax.ShapeDtypeStruct((1, 64, H, D), dtype)
  return dispatch.Call(dict(q=x(4), k=x(2), v=x(2)), TOKEN_BLOCKS, interpret, packed)


def test_dense_attention_on_a_gpu(fake_gpu):
  """The model's dense attention: cuDNN where it takes the call, not packed rows (no
  document mask) nor interpret mode nor float32: the compressed kernel over one-token
  blocks there; the reference for inputs no kernel takes (float64)."""
  choose = lambda call, impl="auto": dispatch.choose("dense_attention", impl, call)
  assert choose(_dense_call(jnp.bfloat16)) == "cudnn"
  assert choose(_dense_call(jnp.bfloat16, packed=True)) == "pallas"
  assert choose(_dense_call(jnp.bfloat16, interpret=True)) == "pallas"
  assert choose(_dense_call(jnp.float32)) == "pallas"
  assert choose(_dense_call(jnp.float64)) == "xla"
  with pytest.raises(ValueError, match=r"dense_attention\(impl='cudnn'\) cannot run .*"
                                       r"segment_ids: cudnn: segment_ids \(packed rows\)"):
    choose(_dense_call(jnp.bfloat16, packed=True), "cudnn")


def test_dense_attention_off_a_gpu():
  """On the CPU "auto" is the reference; "pallas" runs the kernel in interpret mode;
  "cudnn" raises a ValueError naming why, from the op before anything is traced."""
  choose = lambda impl, **kw: dispatch.choose("dense_attention", impl,
                                              _dense_call(jnp.float32, **kw))
  assert choose("auto") == choose("auto", packed=True) == choose("xla") == "xla"
  assert choose("pallas") == "pallas"
  with pytest.raises(ValueError, match="need a GPU backend"):
    choose("pallas", interpret=False)
  q = jnp.zeros((1, 16, 4, 8), jnp.bfloat16)
  k = jnp.zeros((1, 16, 2, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"dense_attention\(impl='cudnn'\) cannot run .*"
                                       r"cuDNN's fused attention needs a GPU backend"):
    dense_attention(q, k, k, impl="cudnn")


def test_nsa_checks_and_chooses_once(monkeypatch):
  """One `nsa` call on concrete packed rows validates the segment ids once and chooses
  each branch's backend once, and that of its selection's compressed pass once; the
  straight-through gate is on, so that its scores run too."""
  config = dataclasses.replace(SMALL, select_gate="straight_through")
  checks, chosen = [], []
  check, choose = segments.check_segment_ids, dispatch.choose
  monkeypatch.setattr(segments, "check_segment_ids",
                      lambda *a, **kw: checks.append(1) or check(*a, **kw))
  monkeypatch.setattr(dispatch, "choose", lambda op, *a, **kw: chosen.append(op) or choose(
      op, *a, **kw))
  B, T, HQ, HKV, D = 1, 64, 2, 1, 8
  x = lambda S, H: rand.normal(rand.key(S + H), (B, S, H, D), jnp.float32)
  kv = lambda S=T: (x(S, HKV), x(S, HKV))
  gates = jnp.full((B, T, HQ, 3), 0.5, jnp.float32)
  ids = jnp.repeat(jnp.arange(2, dtype=jnp.int32), T // 2)[None]
  nsa_jax.nsa(x(T, HQ), *kv(config.num_compressed(T)), *kv(), *kv(), gates, config=config,
              impl="xla", segment_ids=ids)
  assert len(checks) == 1
  assert sorted(chosen) == ["compressed_attention", "compressed_attention", "select_blocks",
                            "selected_attention", "window_attention"]


def test_full_attention_runs_on_the_table(monkeypatch):
  """The full-attention model's attention is chosen by the dispatch table."""
  chosen, choose = [], dispatch.choose
  monkeypatch.setattr(dispatch, "choose", lambda op, *a, **kw: chosen.append(op) or choose(
      op, *a, **kw))
  model = Transformer(ModelConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2,
                                  num_kv_heads=1, attention="full"), rngs=nnx.Rngs(0))
  model(jnp.ones((1, 8), jnp.int32))
  assert chosen == ["dense_attention"]
