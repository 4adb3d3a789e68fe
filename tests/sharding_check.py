"""Sharded-training checks on 8 CPU devices; run by tests/test_sharding.py in a subprocess.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_check.py OUT_DIR

(the flag must be set before jax starts, hence the subprocess). Prints one JSON
object of measured differences and facts; the test asserts on them.
"""
import dataclasses
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from nsa_jax import context, sharding
from nsa_jax.config import NSAConfig
from nsa_jax.model import ModelConfig, Transformer, unstack_layers
from nsa_jax.ops.nsa import nsa
from nsa_jax.train_config import make_config
from nsa_jax.train_lib import make_optimizer, make_steps, restore_checkpoint
from tests import rand

jax.config.update("jax_numpy_rank_promotion", "raise")

B, T = 8, 80          # T = 80 is no parameter's dimension, so it marks activations in the HLO
NSA = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=3, window=16)
MODEL = ModelConfig(d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_hidden=64,
                    nsa=NSA, impl="xla")
TRAIN = make_config("tiny", steps=4, warmup_steps=1, lr=1e-2)


def build(mesh=None, seed=0):
  model = Transformer(MODEL, rngs=nnx.Rngs(seed))
  optimizer = make_optimizer(model, TRAIN)
  if mesh is not None:
    sharding.shard_model_and_optimizer(model, optimizer, mesh)
  return model, optimizer


def packed_rows(rows, length):
  """Segment ids of `rows` rows of two documents each, split at 16, 32, .. (packed rows)."""
  split = NSA.select_block * (np.arange(rows)[:, None] % (length // NSA.select_block - 1) + 1)
  return (np.arange(length)[None, :] >= split).astype(np.int32)


def batch(mesh=None):
  rng = np.random.default_rng(0)
  b = {"inputs": rng.integers(0, 256, (B, T), dtype=np.int32),
       "targets": rng.integers(0, 256, (B, T), dtype=np.int32),
       "weights": (rng.random((B, T)) < 0.9).astype(np.float32),
       "segment_ids": packed_rows(B, T)}
  return b if mesh is None else sharding.shard_batch(b, mesh)


def grads(model, b):
  def loss(model):
    logits = model(b["inputs"], segment_ids=b["segment_ids"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1)[..., 0]
    return jnp.sum(nll * b["weights"]) / jnp.sum(b["weights"])
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fn = jax.jit(lambda p: jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p, rest)))(p))
  return fn(params)


def max_rel_diff(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             / max(float(np.max(np.abs(np.asarray(y)))), 1e-30) for x, y in zip(la, lb))


def max_abs_diff(a, b, floats_only: bool = False) -> float:
  """Largest |a - b| over the leaves of two trees of the same structure, in float64 (unsigned
  leaves such as RNG keys do not wrap around); `floats_only`: over the floating-point leaves
  (parameters, optimizer moments), not step counts or keys."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb), (len(la), len(lb))
  return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)),
                           initial=0.0))
              for x, y in zip(la, lb)
              if not floats_only or jnp.issubdtype(np.asarray(x).dtype, jnp.floating)),
             default=0.0)


def all_gathers(hlo: str) -> list[list[int]]:
  """Result shapes of the all-gathers in a compiled program's HLO text."""
  found = []
  for line in hlo.splitlines():
    match = re.search(r"= \w+\[([\d,]*)\]\S* all-gather(-start)?\(", line)
    if match:
      found.append([int(d) for d in match.group(1).split(",") if d])
  return found


def fsdp_gathered_shapes(state, mesh) -> set[tuple[int, ...]]:
  """What FSDP may gather: each array with its "fsdp" dimensions whole and its "heads"
  dimensions still split; dimensions sorted, as XLA may gather a transposed weight."""
  shapes = set()
  for x in jax.tree.leaves(state):
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    shapes.add(tuple(sorted(d // mesh.shape["heads"] if axis == "heads" else d
                            for d, axis in zip(x.shape, spec))))
  return shapes


def train_step_hlo(mesh, state) -> tuple:
  """train_lib's train step compiled for `mesh`, and its HLO text."""
  graphdef, state = nnx.split(state)
  step = make_steps(graphdef)[0].lower(state, batch(mesh)).compile()
  return step, state, step.as_text()


def main(out: pathlib.Path):
  res = {"devices": jax.device_count()}

  # 1. Gradients and one optimizer step: unsharded vs data=2,fsdp=2,heads=2, on packed rows.
  mesh = sharding.make_mesh("data=2,fsdp=2,heads=2")
  ref_model, ref_opt = build()
  sh_model, sh_opt = build(mesh)
  (ref_loss, ref_g), (sh_loss, sh_g) = grads(ref_model, batch()), grads(sh_model, batch(mesh))
  res["loss"] = [float(ref_loss), float(sh_loss)]
  res["grad_rel_diff"] = max_rel_diff(sh_g, ref_g)
  res["q_proj_spec"] = str(sh_model.blocks[0].attn.q_proj.kernel[...].sharding.spec)
  res["mu_spec"] = [str(x.sharding.spec) for path, x in
                    jax.tree_util.tree_flatten_with_path(nnx.state(sh_opt))[0]
                    if re.search(r"mu/blocks/0/attn/o_proj/kernel", jax.tree_util.keystr(
                        path, simple=True, separator="/"))]

  # The same with the blocks stacked and scanned (parameters of the seed-0 plain model's
  # values), each rematerialised: the layer axis stays whole.
  scan_model = Transformer(dataclasses.replace(MODEL, scan_layers=True, remat="layer"),
                           rngs=nnx.Rngs(0))
  sharding.shard_model_and_optimizer(scan_model, None, mesh)
  scan_loss, scan_g = grads(scan_model, batch(mesh))
  res["scan_loss"] = float(scan_loss)
  res["scan_grad_rel_diff"] = max_rel_diff(unstack_layers(scan_g), ref_g)
  res["scan_q_proj_spec"] = str(scan_model.blocks.attn.q_proj.kernel[...].sharding.spec)

  train_step, state, hlo = train_step_hlo(mesh, (sh_model, sh_opt))
  new_state, metrics = train_step(state, batch(mesh))
  res["step_loss"] = float(metrics["loss"])
  res["step_keeps_shardings"] = all(
      x.sharding.is_equivalent_to(y.sharding, x.ndim)
      for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)))
  gathers = all_gathers(hlo)
  weights = fsdp_gathered_shapes(state, mesh)
  res["weight_all_gathers"] = sum(tuple(sorted(dims)) in weights for dims in gathers)
  # Anything else gathered: an activation or its cotangent (they have a T or Tc
  # dimension, which no parameter has), or a weight gathered over "heads".
  res["other_all_gathers"] = [dims for dims in gathers if tuple(sorted(dims)) not in weights]
  # Without fsdp the step gathers nothing at all.
  data_heads = sharding.make_mesh("data=4,heads=2")
  res["data_heads_all_gathers"] = all_gathers(train_step_hlo(data_heads, build(data_heads))[2])
  # The op's per-shard q, [B / (data*fsdp), T, HQ / heads, Dk], is in the program.
  res["nsa_shard_map_local_shapes"] = bool(
      re.search(rf"f32\[{B // 4},{T},{MODEL.num_heads // 2},{MODEL.head_size}\]", hlo))
  # 2. Checkpoint saved on data=4,heads=2 restores onto data=2,heads=2 (4 devices) and data=8.
  src = sharding.make_mesh("data=4,heads=2")
  model, opt = build(src, seed=1)       # other values than the seed-0 targets below
  nnx.update(opt, new_state[1])         # Adam moments after one step, re-placed below
  sharding.shard_model_and_optimizer(model, opt, src)
  manager = ocp.CheckpointManager(out / "ckpt", options=ocp.CheckpointManagerOptions(create=True))
  manager.save(1, args=ocp.args.Composite(
      model=ocp.args.StandardSave(nnx.state(model)),
      optimizer=ocp.args.StandardSave(nnx.state(opt)),
      meta=ocp.args.JsonSave({"step": 1})))
  manager.wait_until_finished()
  saved = jax.tree.map(np.asarray, nnx.state((model, opt)))
  res["restore"] = {}
  for spec, devices in (("data=2,heads=2", jax.devices()[:4]), ("data=8", None)):
    dst = sharding.make_mesh(spec, devices)
    model2, opt2 = build(dst)                      # fresh init, placed on the new mesh
    before = max_abs_diff(nnx.state((model2, opt2)), saved, floats_only=True)
    restore_checkpoint(manager, 1, model2, opt2)    # train_lib's restore, sharded target
    state2 = nnx.state((model2, opt2))
    want = sharding.state_shardings(state2, dst)
    res["restore"][spec] = {
        "max_abs_diff_before": before,
        "max_abs_diff": max_abs_diff(state2, saved),
        "on_target": all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in
                              zip(jax.tree.leaves(state2), jax.tree.leaves(want)))}
    # The same through sharding.abstract_state (no model needed).
    raw = ocp.StandardCheckpointer().restore(
        (out / "ckpt" / "1" / "model").absolute(),
        sharding.abstract_state(nnx.state(model2), dst))
    res["restore"][spec]["abstract_state_ok"] = all(
        x.sharding.mesh.shape == dst.shape and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(raw), jax.tree.leaves(nnx.state(model2))))
  manager.close()

  # 3. The Pallas kernels (interpret mode) and their VJPs under shard_map vs the reference,
  # on packed rows (segment ids split by batch rows only).
  mesh = sharding.make_mesh("data=4,heads=2")
  keys = rand.split(rand.key(1), 8)
  b, t, hq, hkv, d = 4, 40, 4, 2, 16
  tc = NSA.num_compressed(t)
  shapes = [(b, t, hq, d), (b, tc, hkv, d), (b, tc, hkv, d)] + [(b, t, hkv, d)] * 4 + [(b, t, hq, 3)]
  args = [rand.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]
  args[-1] = jax.nn.sigmoid(args[-1])
  cot = rand.normal(rand.key(2), (b, t, hq, d), jnp.float32)
  op = context.sharded_nsa(mesh)
  segment_ids = jnp.asarray(packed_rows(b, t))

  def out_and_grads(f, **kw):
    def fn(args, cot):
      o, vjp = jax.vjp(lambda *a: f(*a, config=NSA, segment_ids=segment_ids, **kw), *args)
      return o, vjp(cot)
    return jax.jit(fn)(args, cot)

  o_sh, g_sh = out_and_grads(op, impl="pallas", interpret=True)
  o_ref, g_ref = out_and_grads(nsa, impl="xla")
  res["pallas_out_rel_diff"] = max_rel_diff(o_sh, o_ref)
  res["pallas_grad_rel_diff"] = max_rel_diff(g_sh, g_ref)
  res["pallas_out_spec"] = str(o_sh.sharding.spec)
  print(json.dumps(res))


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]))
