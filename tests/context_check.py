"""Context-parallel checks on 8 CPU devices; run by tests/test_context.py in a subprocess.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/context_check.py OUT_DIR

(the flag must be set before jax starts, hence the subprocess). Prints one JSON object of
measured differences and facts; the test asserts on them. Sequences are split over the mesh
axis "context" (nsa_jax.context); every result is compared with the same computation on one
device.
"""
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from nsa_jax import context, sharding
from nsa_jax.config import NSAConfig
from nsa_jax.model import ModelConfig, Transformer
from nsa_jax.module import NativeSparseAttention
from nsa_jax.ops.nsa import nsa
from nsa_jax.train_config import make_config
from nsa_jax.train_lib import make_optimizer, make_steps, restore_checkpoint
from tests.sharding_check import all_gathers, max_abs_diff
from tests import rand

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# w - 1 = 11 > T / 8 = 9: on context=8 the window's halo takes two hops. Dk != Dv, G = 2.
NSA = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=3, window=12)
# The op's cases: (mesh, impl, packed rows). "pallas": the kernels in interpret mode. Each
# context size runs once on the reference (2 beside the data and heads axes; 4 and 8 on packed
# rows, which exchange the same halos and keys as one document per row, and cut them at
# document starts too), the kernels once, on the smallest shards and packed rows (their
# query slices at offsets, unpacked, have their own tests: tests/test_kernel_*.py).
OP_CASES = (("data=2,context=2,heads=2", "xla", False),
            ("context=4", "xla", True), ("context=8", "xla", True),
            ("context=8", "pallas", True))
MODEL = ModelConfig(d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_hidden=64,
                    nsa=NSA, impl="xla")
TRAIN = make_config("tiny", steps=4, warmup_steps=1, lr=1e-2)
# The step's cases: (mesh, packed rows).
STEP_CASES = (("context=4", False), ("data=2,context=2", True))


def mesh_of(spec: str):
  sizes = sharding.parse_mesh(spec)
  return sharding.make_mesh(spec, jax.devices()[:int(np.prod(list(sizes.values())))])


def max_rel_diff(a, b) -> float:
  return max(max_abs_diff(x, y) / max(float(np.max(np.abs(np.asarray(y)))), 1e-30)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------- the op


def op_inputs(T: int, dtype=jnp.float64):
  B, HQ, HKV, Dk, Dv = 2, 4, 2, 8, 6
  Tc = NSA.num_compressed(T)
  shapes = [(B, T, HQ, Dk), (B, Tc, HKV, Dk), (B, Tc, HKV, Dv)] + [
      (B, T, HKV, Dk), (B, T, HKV, Dv)] * 2 + [(B, T, HQ, 3)]
  keys = rand.split(rand.key(0), len(shapes) + 1)
  args = [rand.normal(k, s, dtype) for k, s in zip(keys, shapes)]
  args[-1] = jax.nn.sigmoid(args[-1])
  return args, rand.normal(keys[-1], (B, T, HQ, Dv), dtype)


def packed_rows(B: int, T: int):
  """Segment ids [B, T] of documents starting at multiples of select_block = 16 (packed rows),
  of lengths 16, 32, .. in turn: they cross the shard boundaries of every mesh here."""
  ids = np.zeros((B, T), np.int32)
  for b in range(B):
    starts = np.cumsum([0] + [16 * (1 + (b + i) % 2) for i in range(T // 16)])
    ids[b] = np.searchsorted(starts, np.arange(T), side="right") - 1 + 10 * b
  return jnp.asarray(ids)


def op_results(op, args, cot, **kw):
  """(output, selection, gradients of the 8 inputs) of `op` under jit."""
  def fn(args, cot):
    o, idx = op(*args, config=NSA, return_block_idx=True, **kw)
    _, vjp = jax.vjp(lambda *a: op(*a, config=NSA, **kw), *args)
    return o, idx, vjp(cot)
  return jax.jit(fn)(args, cot)


def check_op(res):
  """The sharded op against the unsharded one on the same backend, T = 72: shards of 36, 18
  and 9 tokens, none a multiple of a block; float64 on the reference ops, float32 on the
  kernels (interpret mode); packed rows whose documents cross the shards."""
  T = 72
  names = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")
  res["op"], unsharded = {}, {}
  for spec, impl, packed in OP_CASES:
    dtype = jnp.float64 if impl == "xla" else jnp.float32
    args, cot = op_inputs(T, dtype)
    kw = dict(impl=impl, interpret=True if impl == "pallas" else None,
              segment_ids=packed_rows(2, T) if packed else None)
    if (impl, packed) not in unsharded:
      unsharded[impl, packed] = op_results(nsa, args, cot, **kw)
    o_ref, idx_ref, g_ref = unsharded[impl, packed]
    o, idx, g = op_results(context.sharded_nsa(mesh_of(spec)), args, cot, **kw)
    res["op"][f"{spec} {impl}" + " packed" * packed] = {
        "impl": impl,
        "out": max_abs_diff(o, o_ref),
        "same_selection": bool(np.array_equal(np.sort(idx, -1), np.sort(idx_ref, -1))),
        "grads": {n: max_abs_diff(a, b) for n, a, b in zip(names, g, g_ref)},
        "out_spec": str(o.sharding.spec)}
  try:
    context.sharded_nsa(mesh_of("context=4"))(*op_inputs(70)[0], config=NSA)
  except ValueError as err:
    res["op_bad_length"] = str(err)


# --------------------------------------------------------------------------- the layer


def check_layer(res):
  """NativeSparseAttention on context=4 (16 tokens a shard: every shard boundary cuts
  compressed blocks, l = 8, d = 4) against the layer on one device, on rows of one document
  and on packed rows (RoPE positions in the documents): output and the gradients of x and
  of every parameter."""
  B, T, d = 2, 64, 32
  x = rand.normal(rand.key(3), (B, T, d), jnp.float64)
  cot = rand.normal(rand.key(4), (B, T, d), jnp.float64)

  def results(mesh, segment_ids):
    layer = NativeSparseAttention(d, 4, 2, head_dim=8, head_dim_v=6, config=NSA, impl="xla",
                                  dtype=jnp.float64, param_dtype=jnp.float64, mesh=mesh,
                                  rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    def fn(params, x, ids):
      y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x, ids), params, x)
      return y, vjp(cot)
    put = (lambda a: a) if mesh is None else (
        lambda a: None if a is None else jax.device_put(a, sharding.batch_sharding(mesh)))
    return jax.jit(fn)(params, put(x), put(segment_ids))

  res["layer"] = {}
  for packed in (False, True):
    ids = packed_rows(B, T) if packed else None
    (y_ref, g_ref), (y, g) = results(None, ids), results(mesh_of("context=4"), ids)
    res["layer"]["packed" if packed else "unpacked"] = {
        "out": max_abs_diff(y, y_ref), "grad_x": max_abs_diff(g[1], g_ref[1]),
        "grad_params": max_abs_diff(g[0], g_ref[0]), "num_params": len(jax.tree.leaves(g[0]))}
  try:
    layer = NativeSparseAttention(d, 4, 2, config=NSA, impl="xla", mesh=mesh_of("context=4"),
                                  rngs=nnx.Rngs(0))
    layer(jnp.zeros((B, 72, d)))            # 18 tokens a shard, not a multiple of d = 4
  except ValueError as err:
    res["layer_bad_length"] = str(err)


# ------------------------------------------------------------------ the training step


def build(mesh=None, seed=0, attention="nsa"):
  model = Transformer(dataclasses.replace(MODEL, attention=attention), rngs=nnx.Rngs(seed))
  optimizer = make_optimizer(model, TRAIN)
  if mesh is not None:
    sharding.shard_model_and_optimizer(model, optimizer, mesh)
  return model, optimizer


def batch(mesh=None, packed=False):
  B, T = 4, 64
  rng = np.random.default_rng(0)
  b = {"inputs": rng.integers(0, 256, (B, T), dtype=np.int32),
       "targets": rng.integers(0, 256, (B, T), dtype=np.int32),
       "weights": (rng.random((B, T)) < 0.9).astype(np.float32)}
  if packed:
    b["segment_ids"] = np.asarray(packed_rows(B, T))
  return b if mesh is None else sharding.shard_batch(b, mesh)


def train_step(mesh, packed=False):
  model, opt = build(mesh)
  graphdef, state = nnx.split((model, opt))
  b = batch(mesh, packed=packed)
  step = make_steps(graphdef)[0].lower(state, b).compile()
  new_state, metrics = step(state, b)
  return new_state, metrics, step


def check_train_step(res, out: pathlib.Path):
  res["step"] = {}
  for spec, packed in STEP_CASES:
    ref_state, ref_metrics, _ = train_step(None, packed)
    state, metrics, step = train_step(mesh_of(spec), packed)
    res["step"][spec + " packed" * packed] = {
        "loss": [float(ref_metrics["loss"]), float(metrics["loss"])],
        "grad_norm": [float(ref_metrics["grad_norm"]), float(metrics["grad_norm"])],
        "state_rel_diff": max_rel_diff(state, ref_state)}
    if spec == "context=4":
      # What the step gathers: [B, T, HKV, D] selected-branch K/V and the compressed
      # keys' [B, T/d, HKV, D] slots (nsa_jax.context); no other activation.
      res["step_all_gathers"] = sorted(all_gathers(step.as_text()))
      saved_state = state

  # Checkpoint after a step on context=4, restored onto one device and onto data=2,context=2.
  model, opt = build(mesh_of("context=4"), seed=1)
  nnx.update((model, opt), saved_state)
  manager = ocp.CheckpointManager(out / "ckpt", options=ocp.CheckpointManagerOptions(create=True))
  manager.save(1, args=ocp.args.Composite(
      model=ocp.args.StandardSave(nnx.state(model)),
      optimizer=ocp.args.StandardSave(nnx.state(opt)), meta=ocp.args.JsonSave({"step": 1})))
  manager.wait_until_finished()
  saved = jax.tree.map(np.asarray, nnx.state((model, opt)))
  res["restore"] = {}
  for spec in ("", "data=2,context=2"):
    dst = mesh_of(spec) if spec else None
    model2, opt2 = build(dst, seed=2)   # other values than the checkpoint's
    before = max_abs_diff(nnx.state((model2, opt2)), saved, floats_only=True)
    restore_checkpoint(manager, 1, model2, opt2)
    state2 = nnx.state((model2, opt2))
    placed = (all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(state2)) if dst is None
              else all(x.sharding.mesh.shape == dst.shape for x in jax.tree.leaves(state2)))
    res["restore"][spec or "one device"] = {"max_abs_diff_before": before,
                                            "max_abs_diff": max_abs_diff(state2, saved),
                                            "on_target": placed}
  manager.close()


def check_full_attention(res):
  model, _ = build(mesh_of("context=2"), attention="full")
  try:
    jax.jit(lambda m, b: m(b["inputs"]))(model, batch(mesh_of("context=2")))
  except ValueError as err:
    res["full_attention_error"] = str(err)


def main(out: pathlib.Path):
  res = {"devices": jax.device_count()}
  check_op(res)
  check_layer(res)
  check_train_step(res, out)
  check_full_attention(res)
  print(json.dumps(res))


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]))
