"""Sharded training (nsa_jax.sharding): mesh specs, parameter placement, and, on 8 CPU
devices in a subprocess (tests/sharding_check.py), sharded == unsharded loss and
gradients, no gathered activations around the NSA op, checkpoints across meshes,
and the Pallas kernels with their VJPs under shard_map."""
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from nsa_jax import sharding
from tests.multi_device import assert_restored, run_check

# float32 everywhere; the sharded program sums gradients across devices in another
# order than the one-device program (psum / reduce-scatter of partial sums), so
# results agree to a few float32 ulps of the largest entry, not bit for bit.
RTOL = 2e-5


def test_parse_mesh():
  assert sharding.parse_mesh("data=2,heads=2") == {"data": 2, "fsdp": 1, "context": 1, "heads": 2}
  assert sharding.parse_mesh("fsdp=-1") == {"data": 1, "fsdp": -1, "context": 1, "heads": 1}
  assert sharding.parse_mesh({"context": 4}) == {"data": 1, "fsdp": 1, "context": 4, "heads": 1}
  for bad, match in (("data=2,model=2", "unknown axes"), ("data", "axis=size"),
                     ("data=x", "axis=size"), ("data=-1,heads=-1", "at most one -1"),
                     ("data=0", ">= 1")):
    with pytest.raises(ValueError, match=match):
      sharding.parse_mesh(bad)


def test_make_mesh_checks_the_device_count():
  mesh = sharding.make_mesh("data=-1")
  assert mesh.axis_names == sharding.AXES and mesh.size == mesh.shape["data"]
  with pytest.raises(ValueError, match=r"needs 64 devices"):
    sharding.make_mesh("data=64")


def test_param_spec_rules():
  mesh = AbstractMesh((2, 2, 2, 2), sharding.AXES)
  spec = lambda name, shape: sharding.param_spec(name, shape, mesh)
  assert spec("blocks/0/attn/q_proj/kernel", (32, 32)) == P("fsdp", "heads")
  assert spec("opt_state/0/mu/blocks/0/attn/o_proj/kernel", (32, 32)) == P("heads", "fsdp")
  assert spec("blocks/0/attn/gate/bias", (12,)) == P("heads")
  assert spec("blocks/0/attn/kv_proj/kernel", (32, 96)) == P("fsdp", "heads")
  assert spec("blocks/0/mlp/gate_up/kernel", (32, 128)) == P("fsdp", None)
  assert spec("embed/embedding", (256, 32)) == P("fsdp", None)
  assert spec("blocks/0/attn_norm/scale", (32,)) == P()
  assert spec("opt_state/0/count", ()) == P()
  # an axis that does not divide its dimension is dropped
  assert spec("blocks/0/attn/q_proj/kernel", (33, 6)) == P(None, "heads")
  # blocks stacked on a layer axis (scan_layers): that axis whole, the rest as per layer
  assert spec("blocks/attn/q_proj/kernel", (2, 32, 32)) == P(None, "fsdp", "heads")
  assert spec("opt_state/0/nu/blocks/attn/o_proj/kernel", (4, 32, 32)) == P(None, "heads", "fsdp")
  assert spec("blocks/attn/gate/bias", (2, 12)) == P(None, "heads")
  assert spec("blocks/attn_norm/scale", (2, 32)) == P()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  return run_check("sharding_check.py", tmp_path_factory.mktemp("sharding"))


def test_sharded_step_matches_unsharded(sharded):
  assert sharded["devices"] == 8
  ref, got = sharded["loss"]
  assert got == pytest.approx(ref, rel=RTOL)
  assert sharded["grad_rel_diff"] < RTOL
  assert sharded["step_loss"] == pytest.approx(ref, rel=RTOL)   # train_lib's train step
  # blocks stacked on a layer axis, scanned and rematerialised: the same loss and gradients
  assert sharded["scan_loss"] == pytest.approx(ref, rel=RTOL)
  assert sharded["scan_grad_rel_diff"] < RTOL
  assert sharded["scan_q_proj_spec"] == str(P(None, "fsdp", "heads"))
  assert sharded["step_keeps_shardings"]
  assert sharded["q_proj_spec"] == str(P("fsdp", "heads"))
  assert sharded["mu_spec"] == [str(P("heads", "fsdp"))]       # Adam moments follow params


def test_no_gathered_activations_around_nsa(sharded):
  # The op runs on local [B/4, T, HQ/2, Dk] blocks (data=2, fsdp=2, heads=2) ...
  assert sharded["nsa_shard_map_local_shapes"]
  # ... the train step's only all-gathers are FSDP's weight gathers (over "fsdp";
  # q/kv/o/gate stay split by head, kv_proj's columns being head-major) ...
  assert sharded["weight_all_gathers"] > 0
  # ... so no activation nor activation cotangent (kv_proj's included) is gathered,
  assert sharded["other_all_gathers"] == []
  # and on data=4, heads=2 (no fsdp) nothing at all is.
  assert sharded["data_heads_all_gathers"] == []


def test_checkpoint_restores_onto_another_mesh(sharded):
  targets = ("data=2,heads=2", "data=8")
  assert_restored(sharded["restore"], targets)
  assert all(sharded["restore"][t]["abstract_state_ok"] for t in targets)


def test_pallas_kernels_under_shard_map(sharded):
  # interpret-mode kernels per (data=4, heads=2) shard vs the one-device XLA reference,
  # on packed rows (segment ids split by batch rows);
  # float32 with differently ordered sums (online softmax, atomic dK/dV accumulation).
  assert sharded["pallas_out_rel_diff"] < RTOL
  assert sharded["pallas_grad_rel_diff"] < RTOL
  assert sharded["pallas_out_spec"] == str(P("data", None, "heads"))
