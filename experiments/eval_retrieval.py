"""Passkey-retrieval accuracy of a trained run over context length x depth (NSA paper Fig. 5).

    python experiments/eval_retrieval.py --run runs/demo [--lengths 128,256] \
        [--depths 0,0.25,0.5,0.75,1] [--samples 8]

A passkey example (`nsa_jax.data.passkey_example`) hides a 5-digit number at a
depth of filler text and asks for it at the end. It counts as retrieved when
the model's argmax predicts every answer digit given the ones before it, which
is exactly what greedy decoding would write. Writes `retrieval.png` (heatmap)
and `retrieval.json` into the run directory (or --out).
"""
from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax import data
from nsa_jax.train_lib import load_model

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def default_lengths(seq_len: int) -> list[int]:
  """Training length and its halvings down to what a passkey example needs."""
  lengths = [seq_len]
  while lengths[0] // 2 >= data.min_length("passkey"):
    lengths.insert(0, lengths[0] // 2)
  return lengths[-4:]


def passkey_accuracy(model, lengths, depths=DEPTHS, *, samples: int = 8,
                     batch_size: int = 8, seed: int = 0) -> np.ndarray:
  """Fraction of passkeys retrieved, [len(lengths), len(depths)].

  Every example is right-padded to the longest length, so one compiled forward
  serves all lengths; causal attention makes the padding invisible to the answer.
  """
  graphdef, state = nnx.split(model)
  width = max(lengths)

  @jax.jit
  def retrieved(state, batch):
    logits = nnx.merge(graphdef, state)(batch["inputs"])
    hit = (jnp.argmax(logits, axis=-1) == batch["targets"]) | (batch["weights"] == 0)
    return jnp.all(hit, axis=-1)

  def padded(example):
    pad = width + 1 - len(example.tokens)
    return data.Example(np.pad(example.tokens, (0, pad)), np.pad(example.weights, (0, pad)))

  examples = [padded(data.passkey_example(np.random.default_rng([seed, n, k]), n + 1, depth))
              for n in lengths for depth in depths for k in range(samples)]
  examples += examples[:1] * (-len(examples) % batch_size)  # whole batches
  hits = np.concatenate([
      np.asarray(retrieved(state, data.collate(examples[i:i + batch_size])))
      for i in range(0, len(examples), batch_size)])
  return hits[:len(lengths) * len(depths) * samples].reshape(
      len(lengths), len(depths), samples).mean(axis=-1)


def plot_heatmap(acc: np.ndarray, lengths, depths, path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
  im = ax.imshow(acc.T, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
  for (i, j), value in np.ndenumerate(acc):
    ax.text(i, j, f"{value:.2f}", ha="center", va="center", fontsize=8)
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("passkey depth")
  ax.set_title(title)
  fig.colorbar(im, ax=ax, label="accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def evaluate_run(run_dir, lengths=None, depths=DEPTHS, *, samples: int = 8,
                 out_dir=None) -> dict:
  """Restores the latest checkpoint of `run_dir`, measures and draws the heatmap."""
  model, cfg, step = load_model(run_dir)
  lengths = lengths or default_lengths(cfg.seq_len)
  acc = passkey_accuracy(model, lengths, depths, samples=samples, seed=cfg.seed)
  out_dir = pathlib.Path(out_dir or run_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  png = out_dir / "retrieval.png"
  plot_heatmap(acc, lengths, depths, png,
               f"passkey retrieval, {cfg.model.attention} attention, step {step}")
  result = {"attention": cfg.model.attention, "step": step, "lengths": list(lengths),
            "depths": list(depths), "samples": samples, "accuracy": acc.tolist(),
            "png": str(png)}
  (out_dir / "retrieval.json").write_text(json.dumps(result, indent=2))
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", required=True, help="run directory (the --out of train.py)")
  parser.add_argument("--lengths", default="", help="comma-separated context lengths")
  parser.add_argument("--depths", default=",".join(map(str, DEPTHS)))
  parser.add_argument("--samples", type=int, default=8, help="passkeys per cell")
  parser.add_argument("--out", default="", help="output directory (default: the run's)")
  args = parser.parse_args(argv)
  lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else None
  depths = [float(d) for d in args.depths.split(",")]
  result = evaluate_run(args.run, lengths, depths, samples=args.samples,
                        out_dir=args.out or None)
  for n, row in zip(result["lengths"], result["accuracy"]):
    print(f"T={n:>6}: " + " ".join(f"{a:.2f}" for a in row))
  print(f"heatmap: {result['png']}")


if __name__ == "__main__":
  main()
