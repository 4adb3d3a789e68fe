"""Training throughput on 1 .. N devices: data, FSDP, head and context parallel (nsa_jax.sharding).

The `gpu-small` preset's train step, jit-compiled over each mesh and timed, per mode
(data, fsdp, heads, context, context_strong) and device count; the context modes are first
checked against the reference on one device (a failure exits 1 after writing the results).
Modes, efficiency and checks: docs/benchmarks.md#scaling. Target (the issue): >= 90 % for
data parallel from 1 to 4 GPUs on gpu-small. Writes scaling.json and scaling.png to --out
(default $OUT, else experiments/results).

GPU (2 or 4 GPUs, ~4 minutes):  PYTHONPATH=. python experiments/bench_scaling.py
Context parallel only (issue #24): PYTHONPATH=. python experiments/bench_scaling.py --modes context,context_strong
CPU smoke run (8 host devices, the tiny preset shrunk to 64 tokens and 8 KV heads):
                                PYTHONPATH=. python experiments/bench_scaling.py --small
"""
from __future__ import annotations

import os
import sys

# Before jax starts: NVLink SHARP (NVLS) collectives fail on our machines; --small
# needs 8 host devices.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
if "--small" in sys.argv:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
  os.environ["JAX_PLATFORMS"] = "cpu"

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import bench_common, gpu_check_units  # noqa: E402
from experiments.bench_train import time_train_step  # noqa: E402
from nsa_jax import context, sharding  # noqa: E402
from nsa_jax.train_config import PRESETS, make_config, override  # noqa: E402

# mode -> (mesh axis, what n devices take): "batch" n x the batch (weak), "same" the
# same batch (strong), "length" sequences n x as long (weak in T), "longest" the
# sequences of the largest n (strong in T).
MODES = {"data": ("data", "batch"), "fsdp": ("fsdp", "batch"), "heads": ("heads", "same"),
         "context": ("context", "length"), "context_strong": ("context", "longest")}
# Per run: (preset, overrides for every mode, further overrides for heads mode).
# The GPU run is gpu-small as is, but for heads mode: the heads axis splits KV
# heads, so 4 (G = 2) instead of 2, split 1, 2 or 4 ways. The CPU smoke run is
# the tiny preset at 64 tokens with 8 KV heads.
RUNS = {
    "gpu": ("gpu-small", {}, dict(num_kv_heads=4)),
    "small": ("tiny", dict(d_model=32, num_layers=1, num_heads=8, num_kv_heads=8, head_dim=8,
                           impl="xla", compress_block=8, compress_stride=4, select_block=16,
                           num_selected=3, window=16, seq_len=64, mixture="text"), {}),
}


def time_steps(cfg, mesh_spec: str, n: int, batch_size: int, iters: int) -> dict:
  """Median train-step time of `cfg`'s model on the first n devices with mesh `mesh_spec`."""
  mesh = sharding.make_mesh(mesh_spec, jax.devices()[:n])
  r = time_train_step(cfg, batch_size, steps=iters, mesh=mesh)
  return {"mesh": mesh_spec, "devices": n, "batch": batch_size, "seq_len": cfg.seq_len,
          "step_ms": r["step_ms"], "tokens_per_s": r["tokens_per_s"],
          "tokens_per_s_per_device": r["tokens_per_s"] / n, "loss": r["loss_last"],
          "compile_s": r["compile_s"], "peak_gib": r["peak_gib"]}


def check_context(model, n: int, seq_len: int) -> dict:
  """The NSA op of `model`'s shape (one sequence of seq_len tokens, its compute dtype) on
  the first n devices as mesh context=n, against the float32 reference on one device
  (module doc). Returns {quantity: {"rel", "max_rel", "ok"}} and "ok" overall."""
  config, dtype = model.nsa, model.compute_dtype
  D = model.head_size
  x = bench_common.random_nsa_inputs(1, seq_len, model.num_heads, model.num_kv_heads, D, D,
                                     config, dtype, jax.random.key(n))
  args, cotangent = [x[name] for name in gpu_check_units.NSA_ARGS], x["cotangent"]
  op = context.sharded_nsa(sharding.make_mesh(f"context={n}", jax.devices()[:n]))
  selection = jax.jit(lambda *a: op(*a, config=config, return_block_idx=True)[1])(*args)
  fb = lambda f, a: jax.jit(bench_common.forward_backward(f, len(a)))(*a, selection, cotangent)
  got = fb(lambda *a: op(*a[:-1], config=config), args)
  with gpu_check_units.reference_precision("float32"):
    want = fb(gpu_check_units.gated_reference(config), gpu_check_units.upcast(args))
    scores = gpu_check_units.reference_scores(*gpu_check_units.upcast(args[:2]), config=config)
  names = ["o"] + ["d" + name for name in gpu_check_units.NSA_ARGS]
  tol = gpu_check_units.tolerance("nsa", jnp.dtype(dtype).name)
  out = {}
  for name, a, b in zip(names, jax.tree.leaves(got), jax.tree.leaves(want)):
    m = {k: float(v) if k != "ok" else bool(v) for k, v in gpu_check_units.measure(a, b).items()}
    out[name] = {**m, "ok": m["ok"] and m["rel"] <= tol}
  bad, gap = gpu_check_units.selection_check(selection, scores, config=config)
  out["block_idx"] = {"rel": float(gap), "bad_rows": int(bad),
                      "ok": int(bad) == 0 and float(gap) <= gpu_check_units.TIE_RTOL}
  out["ok"] = all(v["ok"] for v in out.values())
  return out


def case(cfg, mode: str, n: int, batch: int, largest: int):
  """(config, batch size) of `mode` on n devices, `largest` the most devices of the run."""
  takes = MODES[mode][1]
  seq_len = cfg.seq_len * {"length": n, "longest": largest}.get(takes, 1)
  return override(cfg, seq_len=seq_len), batch * n if takes == "batch" else batch


def plot(path: str, results: dict, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for k, (mode, rows) in enumerate(results.items()):
    ns = [r["devices"] for r in rows]
    ax.plot(ns, [100 * r["efficiency"] for r in rows], marker="o", label=mode)
    for r in rows:
      ax.annotate(f"{r['tokens_per_s'] / 1e3:.0f}k tok/s", (r["devices"], 100 * r["efficiency"]),
                  textcoords="offset points", xytext=(0, 6 if k % 2 == 0 else -14),
                  ha="center", fontsize=8)   # alternate modes above / below: no overlap
  ax.axhline(90, color="gray", ls="--", lw=1, label="90 % target")
  ax.set_xscale("log", base=2)
  ns = sorted({r["devices"] for rows in results.values() for r in rows})
  ax.set_xticks(ns, [str(n) for n in ns])
  ax.set_xlabel("devices")
  ax.set_ylabel("efficiency (%): tokens/s per device / 1 device")
  ax.set_title(f"NSA training ({title}) scaling on {bench_common.gpu_name()}")
  ax.grid(alpha=0.3)
  ax.legend()
  bench_common.save_figure(fig, path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="CPU smoke run, 8 host devices")
  parser.add_argument("--per_device_batch", type=int, default=None,
                      help="sequences per device (data, fsdp) / in all (heads, context "
                           "modes); default: the preset's batch_size")
  parser.add_argument("--max_devices", type=int, default=None, help="default: all devices")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--out", default=bench_common.default_out_dir())
  args = parser.parse_args()
  if args.iters < 10:
    parser.error(f"--iters={args.iters} must be >= 10 (docs/benchmarks.md#timing-method)")
  modes = args.modes.split(",")
  if set(modes) - set(MODES):
    parser.error(f"--modes={args.modes}: modes are {','.join(MODES)}")
  preset, overrides, heads_overrides = RUNS["small" if args.small else "gpu"]
  batch = args.per_device_batch or PRESETS[preset].config.batch_size
  devices = min(args.max_devices or jax.device_count(), jax.device_count())
  base = make_config(preset, **overrides, batch_size=batch, progress=False)
  configs = {mode: override(base, **heads_overrides) if mode == "heads" else base
             for mode in modes}
  print(f"{devices} x {bench_common.gpu_name()}; {preset} preset, "
        f"{batch} sequences per device (data, fsdp) / in all (heads, context modes)")

  # Each program is timed once per (config, batch, mesh), its row shared by the modes: one
  # device runs the same program whatever its mesh axis is called, and context_strong on the
  # most devices is context's last row.
  results, checks, timed = {}, {}, {}
  for mode, cfg in configs.items():
    heads = cfg.model.num_kv_heads
    counts = [n for n in (1, 2, 4, 8, 16)
              if n <= devices and not (mode == "heads" and heads % n)]
    if MODES[mode][0] == "context" and not checks:
      for n in counts[1:]:
        checks[n] = check_context(cfg.model, n, cfg.seq_len * counts[-1])
        worst = max(v["rel"] for k, v in checks[n].items() if k != "ok")
        print(f"check context={n}: {'ok' if checks[n]['ok'] else 'FAILED'} "
              f"(worst relative error {worst:.2g})", flush=True)
    rows = []
    for n in counts:
      mode_cfg, batch_size = case(cfg, mode, n, batch, counts[-1])
      mesh = f"{MODES[mode][0]}={n}"
      key = (mode_cfg, batch_size, mesh if n > 1 else 1)
      if key not in timed:
        timed[key] = time_steps(mode_cfg, mesh, n, batch_size, args.iters)
      rows.append(dict(timed[key], mesh=mesh))
      rows[-1]["efficiency"] = (rows[-1]["tokens_per_s_per_device"]
                                / rows[0]["tokens_per_s_per_device"])
      print(f"{mode}={n}: {rows[-1]['step_ms']:.1f} ms/step, "
            f"{rows[-1]['tokens_per_s']:,.0f} tok/s, efficiency {100 * rows[-1]['efficiency']:.1f} %",
            flush=True)
    results[mode] = rows
  bench_common.print_table(
      ["mode", "devices", "batch", "T", "step ms", "tok/s", "tok/s/dev", "efficiency",
       "peak GiB", "compile s"],
      [[m, r["devices"], r["batch"], r["seq_len"], r["step_ms"], r["tokens_per_s"],
        r["tokens_per_s_per_device"], r["efficiency"], r["peak_gib"], r["compile_s"]]
       for m, rows in results.items() for r in rows])
  os.makedirs(args.out, exist_ok=True)
  bench_common.write_json(
      os.path.join(args.out, "scaling.json"), {"results": results, "context_checks": checks},
      config=dict(preset=preset, overrides=overrides, model=base.model,
                  seq_len=base.seq_len, heads_overrides=heads_overrides,
                  per_device_batch=batch, heads_global_batch=batch, iters=args.iters))
  plot(os.path.join(args.out, "scaling.png"), results, f"{preset} preset")
  failed = [n for n, c in checks.items() if not c["ok"]]
  if failed:
    sys.exit(f"context check FAILED on context={failed}: see context_checks in scaling.json")


if __name__ == "__main__":
  main()
