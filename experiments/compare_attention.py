"""NSA vs full attention: same model, data, steps and tokens; one run each, then the comparison.

    python -m experiments.compare_attention --out runs/compare          # GPU, preset gpu-compare
    python -m experiments.compare_attention --small --out /tmp/compare  # CPU smoke test

For each attention ("nsa", then "full") trains `--preset` into <out>/<attention>
(resuming when a checkpoint is there), then measures passkey retrieval on
the final checkpoint. Writes <out>/compare.json (validation curves vs step and
training wall-clock, tokens/s, compile time, retrieval accuracy),
<out>/compare.png (validation loss vs step and vs wall-clock) and
<out>/<attention>/retrieval.png (heatmaps, NSA paper Fig. 5 style).

The preset's `time_limit_s` caps each run's training time so that both fit a
GPU budget; a run that hits it stops early (with a final eval and checkpoint),
and compare.json says how many steps each run did.
"""
from __future__ import annotations

import argparse
import csv
import json
import pathlib

import jax
import numpy as np

from experiments.eval_retrieval import evaluate_run
from nsa_jax.train_config import make_config
from nsa_jax.train_lib import train

ATTENTIONS = ("nsa", "full")


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
  with open(run_dir / "metrics.csv") as f:
    return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def summarize(rows: list[dict]) -> dict:
  """Curves and speed of one run from its metrics rows."""
  val_keys = sorted({k for r in rows for k in r if k.startswith("val_")})
  evals = [r for r in rows if val_keys and val_keys[0] in r]
  steady = [r["tokens_per_s"] for r in rows[1:]] or [rows[0]["tokens_per_s"]]
  return {
      "steps": int(rows[-1]["step"]),
      "train_s": rows[-1]["train_s"],
      "first_step_s": rows[0]["step_s"] + rows[0].get("compile_s", 0.0),   # with compilation
      "tokens_per_s_median": float(np.median(steady)),
      "final_train_loss": rows[-1]["loss"],
      "val": {k: {"step": [int(r["step"]) for r in evals],
                  # training time after the first step, which includes jit compilation
                  "train_s": [r["train_s"] - rows[0]["step_s"] for r in evals],
                  "loss": [r[k] for r in evals]} for k in val_keys},
  }


def plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  styles = ["-", "--", ":"]
  for color, (attention, res) in zip(("C0", "C3"), results["runs"].items()):
    for style, (key, curve) in zip(styles, sorted(res["val"].items())):
      label = (f"{attention} {key[4:]} ({res['tokens_per_s_median']:,.0f} tok/s, "
               f"compile {res['first_step_s']:.0f} s)")
      for ax, x in zip(axes, (curve["step"], curve["train_s"])):
        ax.plot(x, curve["loss"], style, color=color, marker="o", ms=3, label=label)
  for ax, xlabel in zip(axes, ("step", "training wall-clock after the first (compiling) step, s")):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"NSA vs full attention, preset {results['preset']}, "
               f"seq_len {results['seq_len']}, {results['device']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/compare")
  parser.add_argument("--preset", default="gpu-compare")
  parser.add_argument("--small", action="store_true",
                      help="CPU smoke test: preset tiny, short retrieval grid")
  parser.add_argument("--steps", type=int, default=0, help="override the preset's steps")
  parser.add_argument("--time_limit_s", type=float, default=-1.0,
                      help="override the preset's per-run training time cap (0 = none)")
  parser.add_argument("--impl", default="auto", help="NSA ops: auto, pallas or xla")
  parser.add_argument("--samples", type=int, default=8, help="passkeys per heatmap cell")
  args = parser.parse_args(argv)

  preset = "tiny" if args.small else args.preset
  overrides = {"impl": args.impl, "progress": not args.small}
  if args.steps:
    overrides["steps"] = args.steps
  if args.time_limit_s >= 0:
    overrides["time_limit_s"] = args.time_limit_s
  out = pathlib.Path(args.out)
  results = {"preset": preset, "device": str(jax.devices()[0].device_kind),
             "jax": jax.__version__, "runs": {}}
  for attention in ATTENTIONS:
    cfg = make_config(preset, attention=attention, out=str(out / attention), **overrides)
    results["seq_len"], results["batch_size"] = cfg.seq_len, cfg.batch_size
    train(cfg)
    summary = summarize(read_metrics(cfg.out_dir))
    summary["tokens"] = summary["steps"] * cfg.batch_size * cfg.seq_len
    lengths = [128, 160] if args.small else None
    depths = [0.0, 0.5, 1.0] if args.small else (0.0, 0.25, 0.5, 0.75, 1.0)
    samples = 2 if args.small else args.samples
    summary["retrieval"] = evaluate_run(cfg.out_dir, lengths, depths, samples=samples)
    results["runs"][attention] = summary
    print(f"{attention}: {summary['steps']} steps in {summary['train_s']:.0f} s, "
          f"{summary['tokens_per_s_median']:,.0f} tokens/s, final val "
          + ", ".join(f"{k} {v['loss'][-1]:.4f}" for k, v in summary["val"].items()))
  (out / "compare.json").write_text(json.dumps(results, indent=2))
  plot(results, out / "compare.png")
  print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")


if __name__ == "__main__":
  main()
