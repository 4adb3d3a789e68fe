"""Passkey retrieval of a trained run over context length x depth (NSA paper Fig. 5), and where NSA looks.

    python -m experiments.eval_retrieval --run runs/demo [--lengths 128,256] \
        [--depths 0,0.25,0.5,0.75,1] [--samples 8]

A passkey example (`nsa_jax.data.passkey_example`) hides a 5-digit number at a
depth of filler text and asks for it at the end. It counts as retrieved when
the model's argmax predicts every answer digit given the ones before it, which
is exactly what greedy decoding would write.

For an NSA model it also measures **selection recall** (paper §3.3.2): per
layer and KV group, how often a selection block holding the needle sentence
is among the blocks selected for the answer's tokens (the queries that
predict the digits), next to the recall a random choice of the free slots
would reach (`chance`; 1 where the needle lies in a block always selected).

Writes `retrieval.png` (heatmaps) and `retrieval.json` into the run directory
(or --out) and prints the tables. A run whose training mixture had no passkeys
is evaluated too, with a note saying that it never saw one.
"""
from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from nsa_jax import data
from nsa_jax.ops.nsa import nsa
from nsa_jax.train_lib import load_model

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def default_lengths(seq_len: int) -> list[int]:
  """Training length and its halvings down to what a passkey example needs."""
  lengths = [seq_len]
  while lengths[0] // 2 >= data.min_length("passkey"):
    lengths.insert(0, lengths[0] // 2)
  return lengths[-4:]


def passkey_examples(lengths, depths, samples: int, seed: int) -> list[dict]:
  """`samples` passkeys of every (length, depth) cell, as dicts: the example (`length` + 1
  tokens), the answer's query positions and the needle's [start, stop)."""
  cells = []
  for n in lengths:
    for depth in depths:
      for k in range(samples):
        ex = data.passkey_example(np.random.default_rng([seed, n, k]), n + 1, depth)
        cells.append({"example": ex, "length": n, "depth": depth,
                      "answer": np.flatnonzero(ex.weights[1:]),   # positions predicting digits
                      "needle": data.needle_span(n + 1, depth)})
  return cells


def layer_outputs_and_selections(model, inputs, answer):
  """Logits of `model` on inputs [B, T], and, for an NSA model, every layer's block_idx at
  the `answer` positions [B, D]: [L, B, D, HKV, n] (None for full attention).

  Each layer runs `nsa(..., return_block_idx=True)` on its own branch inputs
  through the model's `attend` hook, so the blocks are the ones its output used.
  """
  if model.config.attention != "nsa":
    return model(inputs), None
  found = []

  def attend(i, attn, h):
    o, block_idx = nsa(**attn.branch_inputs(h), config=attn.config, impl=attn.impl,
                       return_block_idx=True)
    found.append(jnp.take_along_axis(block_idx, answer[:, :, None, None], axis=1))
    return attn.o_proj(o.reshape(*h.shape[:2], attn.num_heads * attn.dv))

  return model(inputs, attend=attend), jnp.stack(found)


def run_probe(model, cells, batch_size: int):
  """(retrieved [N] bool, block_idx at the answer [N, L, D, HKV, n] or None) of every cell.

  Every example is right-padded to the longest length, so one compiled forward
  serves all lengths; causal attention makes the padding invisible to the answer.
  """
  graphdef, state = nnx.split(model)
  width = max(c["length"] for c in cells)

  @jax.jit
  def probe(state, batch, answer):
    logits, selections = layer_outputs_and_selections(nnx.merge(graphdef, state),
                                                      batch["inputs"], answer)
    hit = (jnp.argmax(logits, axis=-1) == batch["targets"]) | (batch["weights"] == 0)
    return jnp.all(hit, axis=-1), selections

  def padded(example):
    pad = width + 1 - len(example.tokens)
    return data.Example(np.pad(example.tokens, (0, pad)), np.pad(example.weights, (0, pad)))

  cells = cells + cells[:1] * (-len(cells) % batch_size)   # whole batches
  hits, selections = [], []
  for i in tqdm(range(0, len(cells), batch_size), desc="passkeys", unit="batch", disable=None,
                leave=False):
    chunk = cells[i:i + batch_size]
    hit, sel = probe(state, data.collate([padded(c["example"]) for c in chunk]),
                     jnp.asarray(np.stack([c["answer"] for c in chunk])))
    hits.append(np.asarray(hit))
    if sel is not None:
      selections.append(np.moveaxis(np.asarray(sel), 0, 1))
  return np.concatenate(hits), (np.concatenate(selections) if selections else None)


def needle_blocks(cell, select_block: int) -> np.ndarray:
  start, stop = cell["needle"]
  return np.arange(start // select_block, (stop - 1) // select_block + 1)


def chance_of_selection(cell, config) -> float:
  """Recall of a random choice of the free slots: for each answer query, 1 when a needle
  block is always selected (initial or local), else the chance that the n - forced free
  slots, drawn from the other candidate blocks, hold a needle block."""
  needle = needle_blocks(cell, config.select_block)
  out = []
  for t in cell["answer"]:
    current = t // config.select_block
    forced = {*range(min(config.num_initial, current + 1)),
              *range(max(0, current - config.num_local + 1), current + 1)}
    if forced & set(needle):
      out.append(1.0)
      continue
    others = current + 1 - len(forced)
    free = min(config.num_selected - len(forced), others)
    miss = np.prod([(others - free - i) / (others - i) for i in range(len(needle))])
    out.append(1.0 - miss)
  return float(np.mean(out))


def passkey_probe(model, lengths, depths=DEPTHS, *, samples: int = 8, batch_size: int = 8,
                  seed: int = 0, record: tuple[int, float] | None = None) -> dict:
  """Accuracy [len(lengths), len(depths)] and, for NSA, selection recall.

  NSA adds "selection_recall": {"per_layer_group": [L][HKV][lengths][depths],
  "mean" (over layers and groups), "max" (the best layer/group per cell),
  "chance"} and, with `record` = (length, depth), "example": sample 0 of that
  cell, with the blocks each answer query selected per layer and group.
  """
  cells = passkey_examples(lengths, depths, samples, seed)
  hits, selections = run_probe(model, cells, batch_size)
  shape = (len(lengths), len(depths), samples)
  result = {"lengths": list(lengths), "depths": list(depths), "samples": samples,
            "accuracy": hits[:len(cells)].reshape(shape).mean(-1).tolist()}
  if selections is None:
    return result
  config = model.config.nsa
  selections = selections[:len(cells)]                          # [N, L, D, HKV, n]
  found = np.stack([np.isin(s, needle_blocks(c, config.select_block)).any(-1)
                    for c, s in zip(cells, selections)])        # [N, L, D, HKV]
  L, HKV = found.shape[1], found.shape[3]
  recall = found.mean(2).reshape(*shape, L, HKV).mean(2)        # [len, depth, L, HKV]
  per_layer_group = np.moveaxis(recall, (2, 3), (0, 1))
  chance = np.array([chance_of_selection(c, config) for c in cells]).reshape(shape).mean(-1)
  result["selection_recall"] = {
      "per_layer_group": per_layer_group.tolist(), "mean": recall.mean((2, 3)).tolist(),
      "max": recall.max((2, 3)).tolist(), "chance": chance.tolist()}
  if record is not None:
    i = next(i for i, c in enumerate(cells) if (c["length"], c["depth"]) == tuple(record))
    c = cells[i]
    tokens = c["example"].tokens
    result["example"] = {
        "length": c["length"], "depth": c["depth"], "needle": list(map(int, c["needle"])),
        "needle_text": bytes(tokens[slice(*c["needle"])]).decode(),
        "needle_blocks": needle_blocks(c, config.select_block).tolist(),
        "answer_positions": c["answer"].tolist(),
        "answer_text": bytes(tokens[c["answer"] + 1]).decode(),
        "retrieved": bool(hits[i]),
        "select_block": config.select_block, "num_selected": config.num_selected,
        "num_initial": config.num_initial, "num_local": config.num_local,
        "window": config.window,
        # block_idx[layer][group][answer query] = the n selected blocks (-1: empty slot)
        "block_idx": np.moveaxis(selections[i], 2, 1).tolist()}
  return result


def draw_heatmap(ax, values, lengths, depths, title: str, label: str = "accuracy") -> None:
  """Fig. 5 of the paper: context length across, depth down, green = 1."""
  values = np.asarray(values)
  im = ax.imshow(values.T, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
  for (i, j), value in np.ndenumerate(values):
    ax.text(i, j, f"{value:.2f}", ha="center", va="center", fontsize=8)
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  ax.set_title(title, fontsize=10)
  ax.figure.colorbar(im, ax=ax, label=label)


def plot_heatmaps(path, panels: list[tuple[str, str, list]], lengths, depths,
                  suptitle: str = "") -> None:
  """One heatmap per (title, colorbar label, values [len(lengths)][len(depths)]) side by side."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(panels), squeeze=False,
                           figsize=(len(panels) * (1.1 * len(lengths) + 2.5),
                                    0.6 * len(depths) + 1.8))
  for ax, (title, label, values) in zip(axes[0], panels):
    draw_heatmap(ax, values, lengths, depths, title, label)
  if suptitle:
    fig.suptitle(suptitle, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def draw_example(ax, example: dict) -> None:
  """One recorded passkey (`passkey_probe(record=...)`): per NSA layer and KV group (rows),
  the share of the answer's queries that selected each block (columns); the needle's
  blocks framed in red."""
  from matplotlib.patches import Rectangle
  sel = np.asarray(example["block_idx"])                     # [L, HKV, D, n]
  L, G, D, _ = sel.shape
  num_blocks = -(-example["length"] // example["select_block"])
  share = np.zeros((L * G, num_blocks))
  for r, queries in enumerate(sel.reshape(L * G, D, -1)):
    for blocks in queries:
      share[r, blocks[blocks >= 0]] += 1 / D
  im = ax.imshow(share, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
  for j in example["needle_blocks"]:
    ax.add_patch(Rectangle((j - 0.5, -0.5), 1, L * G, fill=False, edgecolor="red", lw=2))
  ax.set_yticks(range(L * G), [f"layer {l}, group {g}" for l in range(L) for g in range(G)])
  ax.set_xlabel(f"selection block ({example['select_block']} tokens; the first "
                f"{example['num_initial']} and the last {example['num_local']} are always "
                f"selected)")
  ax.set_title(f"needle {example['needle_text'].strip()!r}, tokens {example['needle'][0]}-"
               f"{example['needle'][1] - 1} of {example['length']} (red)\nblocks selected by "
               f"the queries that predict the answer {example['answer_text']!r} "
               f"({'retrieved' if example['retrieved'] else 'not retrieved'})", fontsize=9)
  ax.figure.colorbar(im, ax=ax, label="share of the answer's queries")


def retrieval_panels(result: dict, name: str) -> list[tuple[str, str, list]]:
  """Heatmap panels of one model's result: accuracy, and NSA's mean selection recall."""
  panels = [(f"{name}: passkey accuracy", "accuracy", result["accuracy"])]
  if "selection_recall" in result:
    panels.append((f"{name}: needle block selected\n(mean over layers and KV groups)",
                   "selection recall", result["selection_recall"]["mean"]))
  return panels


def passkey_note(mixture: str) -> str | None:
  """A warning when a run's training mixture had no passkeys (then ~0 % is expected)."""
  if "passkey" in data.parse_mixture(mixture):
    return None
  return (f"this run never saw a passkey in training (mixture={mixture!r}): expect ~0 % "
          f"retrieval; train with passkeys in the mixture (e.g. --mixture "
          f"text:0.7,passkey:0.3), or see experiments/retrieval.py")


def print_tables(result: dict) -> None:
  """Accuracy (and NSA's selection recall) per length, with the depths in the header."""
  header = "T \\ depth " + " ".join(f"{100 * d:>5.0f}%" for d in result["depths"])
  grids = [("passkey accuracy (all digits right, greedy)", result["accuracy"])]
  if "selection_recall" in result:
    rec = result["selection_recall"]
    grids += [("selection recall, mean over layers and KV groups", rec["mean"]),
              ("selection recall by chance (random free slots)", rec["chance"])]
  for title, grid in grids:
    print(title)
    print(header)
    for n, row in zip(result["lengths"], grid):
      print(f"{n:>9} " + " ".join(f"{a:>6.2f}" for a in row))


def evaluate_run(run_dir, lengths=None, depths=DEPTHS, *, samples: int = 8,
                 out_dir=None) -> dict:
  """Restores the latest checkpoint of `run_dir`, measures and draws the heatmaps."""
  model, cfg, step = load_model(run_dir)
  lengths = lengths or default_lengths(cfg.seq_len)
  note = passkey_note(cfg.mixture)
  if note:
    print(f"note: {note}")
  record = (cfg.seq_len, depths[len(depths) // 2]) if cfg.seq_len in lengths else None
  result = {"attention": cfg.model.attention, "step": step, "train_len": cfg.seq_len,
            "mixture": cfg.mixture, **({"note": note} if note else {}),
            **passkey_probe(model, lengths, depths, samples=samples, seed=cfg.seed,
                            record=record)}
  out_dir = pathlib.Path(out_dir or run_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  result["png"] = str(out_dir / "retrieval.png")
  plot_heatmaps(result["png"], retrieval_panels(result, cfg.model.attention), lengths, depths,
                f"{run_dir}, step {step}, trained at {cfg.seq_len} tokens"
                + (" (no passkeys in training)" if note else ""))
  (out_dir / "retrieval.json").write_text(json.dumps(result, indent=2))
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", required=True, help="run directory (the --out of train.py)")
  parser.add_argument("--lengths", default="", help="comma-separated context lengths "
                      "(default: the training length and up to 3 halvings)")
  parser.add_argument("--depths", default=",".join(map(str, DEPTHS)))
  parser.add_argument("--samples", type=int, default=8, help="passkeys per cell")
  parser.add_argument("--out", default="", help="output directory (default: the run's)")
  args = parser.parse_args(argv)
  lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else None
  depths = [float(d) for d in args.depths.split(",")]
  result = evaluate_run(args.run, lengths, depths, samples=args.samples,
                        out_dir=args.out or None)
  print(f"{result['attention']} attention, step {result['step']}, trained at "
        f"{result['train_len']} tokens; {result['samples']} passkeys per cell")
  print_tables(result)
  if "note" in result:
    print(f"note: {result['note']}")
  print(f"heatmaps: {result['png']}")


if __name__ == "__main__":
  main()
