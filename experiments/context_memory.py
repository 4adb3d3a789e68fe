"""Memory per device of context-parallel training (issue #23), from the compiled program: the
`gpu-small` training step compiled on the CPU for context=P over P = 1, 2, 4, 8 host
devices at two lengths, a line bytes = fixed + per_token * T per P, and the longest
sequence that fits a device of --device_gb (an estimate). Method and its limits:
docs/memory.md#memory-per-device-under-context-parallelism.

    PYTHONPATH=. python experiments/context_memory.py           # ~10 min on 2 CPU cores
    PYTHONPATH=. python experiments/context_memory.py --small   # tiny preset, seconds

Writes context_memory.json and context_memory.png (bytes per device vs T, one line per P, and
the device's capacity) to --out (default $OUT, else experiments/results).
"""
from __future__ import annotations

import os

# Before jax starts: a CPU script on 8 host devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from experiments import bench_common  # noqa: E402
from experiments.bench_train import GIB, program_peak_gib  # noqa: E402
from nsa_jax import sharding  # noqa: E402
from nsa_jax.model import Transformer  # noqa: E402
from nsa_jax.train_config import make_config  # noqa: E402
from nsa_jax.train_lib import make_optimizer, make_steps  # noqa: E402

DEVICES = (1, 2, 4, 8)
RUNS = {"gpu-small": (8192, 16384), "tiny": (2048, 4096)}   # preset: the two lengths


def compiled_bytes(cfg, P: int, T: int) -> dict:
  """Bytes per device of the training step at one sequence of T tokens on context=P."""
  mesh = sharding.make_mesh(f"context={P}", jax.devices()[:P])
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  optimizer = make_optimizer(model, cfg)
  sharding.shard_model_and_optimizer(model, optimizer, mesh)
  graphdef, state = nnx.split((model, optimizer))
  spec = sharding.batch_sharding(mesh)
  batch = {name: jax.ShapeDtypeStruct((1, T), dtype, sharding=spec)
           for name, dtype in (("inputs", np.int32), ("targets", np.int32),
                               ("weights", np.float32))}
  compiled = make_steps(graphdef)[0].lower(state, batch).compile()
  m = compiled.memory_analysis()
  return {"devices": P, "seq_len": T, "peak_bytes": int(program_peak_gib(compiled) * GIB),
          "temp_bytes": m.temp_size_in_bytes, "argument_bytes": m.argument_size_in_bytes,
          "output_bytes": m.output_size_in_bytes}


def fit(rows: list[dict], device_bytes: float) -> dict:
  """The line through a P's two points, and where it reaches `device_bytes`."""
  (t0, b0), (t1, b1) = [(r["seq_len"], r["peak_bytes"]) for r in rows]
  per_token = (b1 - b0) / (t1 - t0)
  fixed = b0 - per_token * t0
  return {"devices": rows[0]["devices"], "fixed_bytes": fixed, "bytes_per_token": per_token,
          "max_seq_len": int((device_bytes - fixed) / per_token)}


def plot(path: str, fits: list[dict], rows: list[dict], device_bytes: float, title: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for f in fits:
    T = np.geomspace(1024, 2 * max(x["max_seq_len"] for x in fits), 50)
    line = ax.plot(T, (f["fixed_bytes"] + f["bytes_per_token"] * T) / 1e9, lw=1,
                   label=f"context={f['devices']}: ~{f['max_seq_len'] / 1e6:.2f}M tokens")
    measured = [r for r in rows if r["devices"] == f["devices"]]
    ax.plot([r["seq_len"] for r in measured], [r["peak_bytes"] / 1e9 for r in measured], "o",
            color=line[0].get_color())
  ax.axhline(device_bytes / 1e9, color="gray", ls="--", lw=1, label="device memory")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("T (tokens of one sequence)")
  ax.set_ylabel("GB per device (compiled program)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  bench_common.save_figure(fig, path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="the tiny preset (smoke test)")
  parser.add_argument("--device_gb", type=float, default=140.0,
                      help="device memory in GB (1e9 bytes); H200: 140")
  parser.add_argument("--max_devices", type=int, default=DEVICES[-1],
                      help=f"the largest context size compiled (of {DEVICES})")
  parser.add_argument("--out", default=bench_common.default_out_dir())
  args = parser.parse_args()
  if args.max_devices < 2:
    parser.error(f"--max_devices={args.max_devices} must be >= 2 (one device is the baseline)")
  devices = [P for P in DEVICES if P <= args.max_devices]
  preset = "tiny" if args.small else "gpu-small"
  lengths = RUNS[preset]
  cfg = make_config(preset, seq_len=lengths[0], batch_size=1, impl="xla", mixture="text",
                    progress=False)
  device_bytes = args.device_gb * 1e9
  cases = [(P, T) for P in devices for T in lengths]
  rows = [compiled_bytes(cfg, P, T) for P, T in tqdm(cases, desc="compiling")]
  fits = [fit([r for r in rows if r["devices"] == P], device_bytes) for P in devices]
  one = fits[0]["bytes_per_token"]
  for f in fits:
    f["per_token_vs_one_device"] = f["bytes_per_token"] / one
  bench_common.print_table(
      ["context", "T", "peak MB", "temp MB"],
      [[r["devices"], r["seq_len"], r["peak_bytes"] / 1e6, r["temp_bytes"] / 1e6] for r in rows])
  bench_common.print_table(
      ["context", "fixed MB", "bytes / token", "x one device", f"T at {args.device_gb:.0f} GB"],
      [[f["devices"], f["fixed_bytes"] / 1e6, f["bytes_per_token"],
        f["per_token_vs_one_device"], f["max_seq_len"]] for f in fits])
  os.makedirs(args.out, exist_ok=True)
  bench_common.write_json(os.path.join(args.out, "context_memory.json"),
                          {"rows": rows, "fits": fits},
                          config=dict(preset=preset, model=cfg.model, batch_size=1,
                                      seq_lens=lengths, device_gb=args.device_gb))
  plot(os.path.join(args.out, "context_memory.png"), fits, rows, device_bytes,
       f"{preset} training step, 1 sequence, per device (CPU compile, reference ops)")


if __name__ == "__main__":
  main()
