"""The size rule of the cuDNN call (nsa_jax/ops/cudnn.py, issue #18 point 1).

No cuDNN call holds a tensor of 2^31 elements: `call_plan` splits a call into
chunks of batch rows or of KV groups, or refuses it (the branch then runs on a
Pallas kernel). Bytes do not count (the GPU probe cited in cudnn.py's doc). The rule reads static shapes only, so it is tested
here on the CPU; a split call runs through jax's XLA implementation of the
same attention call (the `cudnn_calls` fixture) and must equal the whole call.
experiments/gpu_check.py --matrix runs the issue's shapes on a GPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig
from nsa_jax.ops import cudnn, dispatch
from tests import rand

LIMIT = 2 ** 31


def fits(rows, groups, T, G, D):
  """Whether a call over `rows` rows and `groups` KV groups stays under the limit,
  counted independently of `call_plan`: q, o, do and the float32 dq accumulator
  hold rows * T * groups * G * D elements (k and v fewer)."""
  return rows * T * groups * G * D < LIMIT


def test_call_plan_of_the_issue_shapes():
  # B=9, T=32k, HQ=64, D=128: a row holds 2^28 elements of q, so 7 rows per call.
  assert cudnn.call_plan(9, 32768, 64, 4, 128) == cudnn.CallPlan(rows=7, groups=4)
  # One row of 256k tokens at HQ=64: q alone holds 2^31 elements, one KV group
  # (16 heads) 2^29: 3 of the 4 groups per call.
  assert cudnn.call_plan(1, 262144, 64, 4, 128) == cudnn.CallPlan(rows=1, groups=3)
  # Config A at 64k (2^29 elements): one call, as before the rule.
  assert cudnn.call_plan(1, 65536, 64, 4, 128) == cudnn.CallPlan(rows=1, groups=4)
  # One KV group of one row reaches 2^31 at 1M tokens: cuDNN is refused.
  assert cudnn.call_plan(1, 1048576, 64, 4, 128) is None


@pytest.mark.parametrize("B,T,HQ,HKV,D", [
    (9, 32768, 64, 4, 128), (1, 262144, 64, 4, 128), (1, 65536, 64, 4, 128),
    (4, 8192, 64, 4, 128), (16, 16384, 64, 4, 128), (1, 131072, 64, 8, 192),
    (3, 524288, 8, 8, 64), (2, 1048576, 32, 2, 256), (5, 100, 4, 2, 8)], ids=str)
def test_call_plan_fits_and_splits_no_more_than_needed(B, T, HQ, HKV, D):
  G = HQ // HKV
  plan = cudnn.call_plan(B, T, HQ, HKV, D)
  if plan is None:
    assert not fits(1, 1, T, G, D)
  elif plan.groups == HKV:   # whole rows: as many as fit
    assert 1 <= plan.rows <= B and fits(plan.rows, HKV, T, G, D)
    assert plan.rows == B or not fits(plan.rows + 1, HKV, T, G, D)
  else:                      # a row is too large: as many groups as fit
    assert plan.rows == 1 and not fits(1, HKV, T, G, D)
    assert 1 <= plan.groups and fits(1, plan.groups, T, G, D)
    assert not fits(1, plan.groups + 1, T, G, D)


def test_branches_past_2_31_are_split_or_leave_cudnn(monkeypatch):
  """The dispatch table under the rule, with a Hopper GPU faked: the issue's
  batch and a 256k row at HQ=64 stay on cuDNN (split); a 1M row leaves it for
  the window branch, not for the compressed branch (folded by stride residue,
  its rows are d times shorter); impl="cudnn" on the 1M window raises, naming
  the sizes."""
  class Hopper:
    platform = "gpu"
    compute_capability = "9.0"

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda: [Hopper()])
  cfg = NSAConfig()

  def calls(B, T, HQ=64, HKV=4, D=128):
    x = lambda T, H: jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
    Tc = cfg.num_compressed(T)
    return {"compressed_attention": dispatch.Call(
                dict(q=x(T, HQ), k_cmp=x(Tc, HKV), v_cmp=x(Tc, HKV)), cfg, None),
            "window_attention": dispatch.Call(dict(q=x(T, HQ), k=x(T, HKV), v=x(T, HKV)),
                                              cfg, None)}

  on_cudnn = {"compressed_attention": "cudnn", "window_attention": "cudnn"}
  for impl in ("auto", "pallas"):
    assert dispatch.nsa_branches(impl, calls(9, 32768)) == on_cudnn
    assert dispatch.nsa_branches(impl, calls(1, 262144)) == on_cudnn
    assert dispatch.nsa_branches(impl, calls(1, 1048576)) == dict(
        on_cudnn, window_attention="pallas")
  with pytest.raises(ValueError, match=r"q \[1, 1048576, 64, 128\] bfloat16.*under 2\^31"):
    dispatch.choose("window_attention", "cudnn", calls(1, 1048576)["window_attention"])


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("max_elements,calls", [
    (700, [(2, 10, 4, 8), (1, 10, 4, 8)]),   # 2 rows of 320 elements per call
    (200, [(1, 10, 2, 8)] * 6),               # a row is too large: one group per call
])
def test_split_call_equals_the_whole_call(cudnn_calls, monkeypatch, window, max_elements, calls):
  """B=3, T=9 (padded to 10), HQ=4, HKV=2, Dk=8, Dv=6 in float32: o, lse and the
  gradients of q, k, v of a call split by a lowered limit equal the whole call's."""
  keys = rand.split(rand.key(0), 4)
  args = [rand.normal(kk, shape, jnp.float32) for kk, shape in
          zip(keys, [(3, 9, 4, 8), (3, 9, 2, 8), (3, 9, 2, 6)])]
  ct = rand.normal(keys[3], (3, 9, 4, 6), jnp.float32)
  f = lambda *a: cudnn.cudnn_causal_attention(*a, scale=0.3, window=window)

  def run():   # traced afresh (the calls and MAX_ELEMENTS are read while tracing), one compile
    cudnn_calls.clear()

    @jax.jit
    def whole_program(args, ct):
      (o, lse), vjp = jax.vjp(f, *args)
      return (o, lse, *vjp((ct, jnp.zeros_like(lse))))
    return whole_program(args, ct), list(cudnn_calls)

  whole, whole_calls = run()
  monkeypatch.setattr(cudnn, "MAX_ELEMENTS", max_elements)
  split, split_calls = run()
  assert whole_calls == [(3, 10, 4, 8)] and split_calls == calls
  for a, b in zip(split, whole):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
