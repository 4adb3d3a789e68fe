"""Passkey retrieval of a trained run over context length x depth (NSA paper Fig. 5), and where NSA looks.

    python -m experiments.eval_retrieval --run runs/demo [--lengths 128,256] \
        [--depths 0,0.25,0.5,0.75,1] [--samples 8]

A passkey (`nsa_jax.data.passkey_example`) counts as retrieved when the model's argmax
predicts every answer digit given the ones before it (what greedy decoding writes). For an
NSA model it also measures selection recall (paper §3.3.2: `chance`, `strict`) and the gates
(paper Eq. 5); what each measures: docs/selection_learning.md#the-retrieval-experiment.
Writes `retrieval.png` (heatmaps) and `retrieval.json` into the run directory (or --out) and
prints the tables; a run whose training mixture had no passkeys is evaluated with a note.
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
from nsa_jax.checkpoints import load_model

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
  """Logits of `model` on inputs [B, T], and, for an NSA model, every layer's block_idx
  [L, B, D, HKV, n] and gates [L, B, D, HQ, 3] at the `answer` positions [B, D]
  ({"block_idx", "gates"}; None for full attention).

  Each layer runs `nsa(..., return_block_idx=True)` on its own branch inputs
  through the model's `attend` hook, so the blocks are the ones its output used.
  """
  if model.config.attention != "nsa":
    return model(inputs), None
  found = {"block_idx": [], "gates": []}
  at_answer = lambda x: jnp.take_along_axis(x, answer[:, :, None, None], axis=1)

  def attend(i, attn, h):
    inputs = attn.branch_inputs(h)
    o, block_idx = nsa(**inputs, config=attn.config, impl=attn.impl, return_block_idx=True)
    found["block_idx"].append(at_answer(block_idx))
    found["gates"].append(at_answer(inputs["gates"]).astype(jnp.float32))
    return attn.o_proj(o.reshape(*h.shape[:2], attn.num_heads * attn.dv))

  logits = model(inputs, attend=attend)
  return logits, {k: jnp.stack(v) for k, v in found.items()}


def run_probe(model, cells, batch_size: int):
  """(retrieved [N] bool, {"block_idx": [N, L, D, HKV, n], "gates": [N, L, D, HQ, 3]} at the
  answer, or None for full attention) of every cell.

  Every example is right-padded to the longest length, so one compiled forward
  serves all lengths; causal attention makes the padding invisible to the answer.
  """
  graphdef, state = nnx.split(model)
  width = max(c["length"] for c in cells)

  @jax.jit
  def probe(state, batch, answer):
    logits, found = layer_outputs_and_selections(nnx.merge(graphdef, state),
                                                 batch["inputs"], answer)
    hit = (jnp.argmax(logits, axis=-1) == batch["targets"]) | (batch["weights"] == 0)
    return jnp.all(hit, axis=-1), found

  def padded(example):
    pad = width + 1 - len(example.tokens)
    return data.Example(np.pad(example.tokens, (0, pad)), np.pad(example.weights, (0, pad)))

  n = len(cells)
  cells = cells + cells[:1] * (-len(cells) % batch_size)   # whole batches
  hits, found = [], []
  for i in tqdm(range(0, len(cells), batch_size), desc="passkeys", unit="batch", disable=None,
                leave=False):
    chunk = cells[i:i + batch_size]
    hit, got = probe(state, data.collate([padded(c["example"]) for c in chunk]),
                     jnp.asarray(np.stack([c["answer"] for c in chunk])))
    hits.append(np.asarray(hit))
    if got is not None:
      found.append({k: np.moveaxis(np.asarray(v), 0, 1) for k, v in got.items()})
  if not found:
    return np.concatenate(hits)[:n], None
  return np.concatenate(hits)[:n], {k: np.concatenate([f[k] for f in found])[:n]
                                    for k in found[0]}


def needle_blocks(cell, select_block: int) -> np.ndarray:
  start, stop = cell["needle"]
  return np.arange(start // select_block, (stop - 1) // select_block + 1)


def key_blocks(cell, select_block: int) -> list[np.ndarray]:
  """The selection blocks holding the key's digits, one array per occurrence of the key in
  the needle sentence (it is written twice)."""
  start = cell["needle"][0]
  before = data.PASSKEY_NEEDLE.split("{key}")[:-1]   # the text before each occurrence
  offsets = np.cumsum([len(t) for t in before]) + data.PASSKEY_DIGITS * np.arange(len(before))
  return [np.arange((start + o) // select_block,
                    (start + o + data.PASSKEY_DIGITS - 1) // select_block + 1) for o in offsets]


def forced_blocks(t: int, config) -> set[int]:
  """The blocks query t always selects: the initial ones and the local ones."""
  current = t // config.select_block
  return {*range(min(config.num_initial, current + 1)),
          *range(max(0, current - config.num_local + 1), current + 1)}


def chance_all_selected(blocks, t: int, config) -> float:
  """Probability that a random choice of query t's free slots (the n - forced slots drawn
  from its other candidate blocks) selects every block of `blocks` (forced ones always are)."""
  forced = forced_blocks(t, config)
  others = t // config.select_block + 1 - len(forced)
  free = min(config.num_selected - len(forced), others)
  missing = len(set(map(int, blocks)) - forced)
  return float(np.prod([(free - i) / (others - i) for i in range(missing)]))


def chance_of_selection(cell, config) -> float:
  """Recall of a random choice of the free slots: for each answer query, 1 when a needle
  block is always selected (initial or local), else the chance that the n - forced free
  slots, drawn from the other candidate blocks, hold a needle block."""
  needle = needle_blocks(cell, config.select_block)
  out = []
  for t in cell["answer"]:
    forced = forced_blocks(t, config)
    if forced & set(needle):
      out.append(1.0)
      continue
    others = t // config.select_block + 1 - len(forced)
    free = min(config.num_selected - len(forced), others)
    miss = np.prod([(others - free - i) / (others - i) for i in range(len(needle))])
    out.append(1.0 - miss)
  return float(np.mean(out))


def chance_of_strict(cell, config) -> float:
  """Strict recall of a random choice of the free slots: mean over the answer queries of
  the chance that they select every block of one of the key's occurrences
  (inclusion-exclusion over the two)."""
  first, second = key_blocks(cell, config.select_block)
  return float(np.mean([chance_all_selected(first, t, config)
                        + chance_all_selected(second, t, config)
                        - chance_all_selected(np.union1d(first, second), t, config)
                        for t in cell["answer"]]))


def strict_hits(cell, block_idx, select_block: int) -> np.ndarray:
  """[..., D] whether each answer query's selection block_idx [..., D, n] holds every block
  of one occurrence of the key."""
  return np.any([np.all([(block_idx == b).any(-1) for b in blocks], axis=0)
                 for blocks in key_blocks(cell, select_block)], axis=0)


def gate_means(gates, hits, shape) -> dict:
  """The mean gates [N, L, D, HQ, 3] of the answer's queries: per layer and depth
  [L][depths][3], and per layer over the passkeys retrieved and those missed [L][3] (None
  where there is none)."""
  per_cell = gates.mean((2, 3))                                 # [N, L, 3]
  by_depth = per_cell.reshape(*shape, *per_cell.shape[1:]).mean((0, 2))   # [depths, L, 3]
  split = {name: per_cell[mask].mean(0).tolist() if mask.any() else None
           for name, mask in (("retrieved", hits), ("missed", ~hits))}
  return {"branches": ["cmp", "slc", "win"],
          "per_layer_depth": np.moveaxis(by_depth, 1, 0).tolist(), **split}


def strict_recall(cells, selections, config, per_cell) -> dict:
  """`strict_hits` of every cell's selections [N, L, D, HKV, n]: "per_layer_group"
  [L][HKV][lengths][depths], "mean" and "max" over the layers >= 1 (all layers for a
  one-layer model) and groups, "chance" (`chance_of_strict`)."""
  hit = np.stack([strict_hits(c, np.moveaxis(s, 1, 2), config.select_block)
                  for c, s in zip(cells, selections)])          # [N, L, HKV, D]
  strict = per_cell(hit.mean(-1))                               # [len, depth, L, HKV]
  deep = strict[:, :, 1:] if strict.shape[2] > 1 else strict
  return {"per_layer_group": np.moveaxis(strict, (2, 3), (0, 1)).tolist(),
          "mean": deep.mean((2, 3)).tolist(), "max": deep.max((2, 3)).tolist(),
          "chance": per_cell(np.array([chance_of_strict(c, config) for c in cells])).tolist()}


def passkey_probe(model, lengths, depths=DEPTHS, *, samples: int = 8, batch_size: int = 8,
                  seed: int = 0, record: tuple[int, float] | None = None) -> dict:
  """Accuracy [len(lengths), len(depths)] and, for NSA, selection recall.

  NSA adds "selection_recall": {"per_layer_group": [L][HKV][lengths][depths],
  "mean" (over layers and groups), "max" (the best layer/group per cell),
  "chance", "strict" (`strict_recall`)}, "gates" (`gate_means`) and, with
  `record` = (length, depth), "example": sample 0 of that cell, with the
  blocks each answer query selected per layer and group.
  """
  cells = passkey_examples(lengths, depths, samples, seed)
  hits, found = run_probe(model, cells, batch_size)
  shape = (len(lengths), len(depths), samples)
  result = {"lengths": list(lengths), "depths": list(depths), "samples": samples,
            "accuracy": hits.reshape(shape).mean(-1).tolist()}
  if found is None:
    return result
  config = model.config.nsa
  selections = found["block_idx"]                                # [N, L, D, HKV, n]
  per_cell = lambda values: values.reshape(*shape, *values.shape[1:]).mean(2)
  hit = np.stack([np.isin(s, needle_blocks(c, config.select_block)).any(-1)
                  for c, s in zip(cells, selections)])          # [N, L, D, HKV]
  recall = per_cell(hit.mean(2))                                # [len, depth, L, HKV]
  chance = per_cell(np.array([chance_of_selection(c, config) for c in cells]))
  result["selection_recall"] = {
      "per_layer_group": np.moveaxis(recall, (2, 3), (0, 1)).tolist(),
      "mean": recall.mean((2, 3)).tolist(), "max": recall.max((2, 3)).tolist(),
      "chance": chance.tolist(),
      "strict": strict_recall(cells, selections, config, per_cell)}
  result["gates"] = gate_means(found["gates"], hits, shape)
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
              ("selection recall by chance (random free slots)", rec["chance"]),
              ("strict recall (every key digit selected), mean over layers >= 1 and KV groups",
               rec["strict"]["mean"]),
              ("strict recall by chance", rec["strict"]["chance"])]
  for title, grid in grids:
    print(title)
    print(header)
    for n, row in zip(result["lengths"], grid):
      print(f"{n:>9} " + " ".join(f"{a:>6.2f}" for a in row))
  if "gates" in result:
    print_gates(result["gates"], result["depths"])


def print_gates(gates: dict, depths) -> None:
  """The mean gates at the answer's queries per layer: at each depth, and over the passkeys
  retrieved and missed."""
  print("mean gates g_cmp / g_slc / g_win at the answer's queries")
  print("layer    " + " ".join(f"{f'{100 * d:.0f}%':>16}" for d in depths)
        + f" {'retrieved':>16} {'missed':>16}")
  fmt = lambda g: "–".rjust(16) if g is None else " " * 4 + "/".join(f"{x:.2f}" for x in g)
  for layer, per_depth in enumerate(gates["per_layer_depth"]):
    split = [gates[k] and gates[k][layer] for k in ("retrieved", "missed")]
    print(f"{layer:>5}    " + " ".join(fmt(g) for g in [*per_depth, *split]))


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
