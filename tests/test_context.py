"""Context parallelism (nsa_jax.context, the mesh axis "context"): on 8 CPU devices in a
subprocess (tests/context_check.py), sequences split over 2, 4 and 8 devices give the
one-device op, layer and training step; checkpoints restore across meshes; what is
gathered; full attention refuses. (Memory per device falling with the devices:
tests/test_experiments_smoke.py::test_context_memory_small.)"""
import pytest

from tests.multi_device import assert_restored, run_check

# float64 ops: the sharded program adds the same terms in another order (psum of the
# compressed keys' partial cotangents, reduce-scatter of the selected K/V's), so results
# agree to a few float64 ulps of their magnitude (inputs ~N(0, 1)), not bit for bit.
F64_TOL = 1e-13
# The kernels (float32 only, interpret mode) on a shard tile its queries from the shard's
# offset, so their online softmax adds in another order too: a few float32 ulps of the
# outputs and gradients (measured: up to 1e-6; inputs ~N(0, 1)).
F32_TOL = 1e-5
# The training step is float32 (parameters, Adam); same reason, float32 ulps: as
# tests/test_sharding.py.
RTOL = 2e-5


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
  return run_check("context_check.py", tmp_path_factory.mktemp("context"))


def test_sharded_nsa_equals_unsharded(checked):
  """One property over (mesh, impl, packed rows): the sharded op's output, selection and
  the gradients of its 8 inputs are the unsharded op's on the same backend."""
  assert checked["devices"] == 8
  assert set(checked["op"]) == {
      "data=2,context=2,heads=2 xla", "context=4 xla packed",
      "context=8 xla packed", "context=8 pallas packed"}
  for case, got in checked["op"].items():
    tol = F64_TOL if got["impl"] == "xla" else F32_TOL
    assert got["out"] < tol, case
    assert got["same_selection"], case
    assert set(got["grads"]) == {"q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win",
                                 "gates"}
    assert max(got["grads"].values()) < tol, (case, got["grads"])
  assert checked["op"]["data=2,context=2,heads=2 xla"]["out_spec"] == (
      "P('data', 'context', 'heads')")
  assert "T=70 of context=4" in checked["op_bad_length"]


def test_layer_compresses_across_shard_boundaries(checked):
  for case, got in checked["layer"].items():   # one document per row, packed rows
    assert got["out"] < F64_TOL and got["grad_x"] < F64_TOL, case
    assert got["grad_params"] < 10 * F64_TOL, case
    assert got["num_params"] == 15, case     # projections, gate, both compression MLPs
  assert set(checked["layer"]) == {"unpacked", "packed"}
  assert "T=72 must be a multiple of context=4 x compress_stride=4" in checked["layer_bad_length"]


def test_train_step_matches_one_device(checked):
  assert set(checked["step"]) == {"context=4", "data=2,context=2 packed"}
  for case, got in checked["step"].items():
    assert got["loss"][1] == pytest.approx(got["loss"][0], rel=RTOL), case
    assert got["grad_norm"][1] == pytest.approx(got["grad_norm"][0], rel=RTOL), case
    assert got["state_rel_diff"] < RTOL, case


def test_only_the_selected_and_compressed_keys_are_gathered(checked):
  # B = 4, T = 64, HKV = 2, head dim 8, d = 4: K and V of the selected branch [B, T, HKV, D]
  # and the compressed keys' and values' slots [B, T/d, HKV, D]; no other activation.
  assert checked["step_all_gathers"] == [[4, 16, 2, 8]] * 2 + [[4, 64, 2, 8]] * 2


def test_checkpoint_restores_across_meshes(checked):
  assert_restored(checked["restore"], ("one device", "data=2,context=2"))


def test_full_attention_refuses_context(checked):
  assert "attention='full' does not run on a mesh with context=2" in checked[
      "full_attention_error"]
