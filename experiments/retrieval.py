"""Does NSA learn to retrieve? NSA against full attention on a passkey / text curriculum (issue #21).

    PYTHONPATH=. python experiments/retrieval.py --out $OUT     # GPU; run it again until it says done
    PYTHONPATH=. python experiments/retrieval.py --small --out /tmp/retrieval   # CPU smoke test

Both models train on the same rows, stage by stage (`--stages`), NSA first, then each is
evaluated by `eval_retrieval.passkey_probe`; work is checkpointed under `--runs`, `--budget_s`
caps one call and the same command continues. Writes retrieval_<gpu>.json / .png to --out.
`--recipes baseline,max,distill,st,combined` trains NSA with each aid to selection learning
(issue #29) and writes retrieval_ablation_<gpu>.json. Curriculum, recipes, outputs and the
CPU miniature: docs/selection_learning.md#the-retrieval-experiment.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments import bench_common
from experiments.compare_attention import read_metrics, summarize
from experiments.eval_retrieval import (draw_example, passkey_probe, plot_heatmaps,
                                        print_tables, retrieval_panels)
from nsa_jax import data
from nsa_jax.train_config import PRESETS, build_parser, make_config
from nsa_jax.train_lib import (checkpoint_manager, load_model, make_optimizer,
                               save_checkpoint, train)

ATTENTIONS = ("nsa", "full")
GPU = dict(preset="gpu-compare",
           stages="256x128:600,512x64:500,1024x32:400,2048x16:400,4096x8:700",
           lengths="1024,2048,4096,8192,16384", samples=16, budget_s=540.0,
           nsa_blocks="16,8,32,8,64")
SMALL = dict(preset="tiny", stages="160x4:6,320x2:6", lengths="160,320,640", samples=2,
             budget_s=0.0, nsa_blocks="")
# The fields stage_config sets itself, which --set may not.
STAGE_FIELDS = ("attention", "out", "seq_len", "batch_size", "steps", "lr", "warmup_steps",
                "min_lr_ratio", "mixture", "pack", "pack_tasks", "text_weight", "eval_every",
                "eval_batches", "ckpt_every", "keep_checkpoints", "time_limit_s", "progress")
BLOCK_FIELDS = ("compress_block", "compress_stride", "select_block", "num_selected", "window")
# The fields with a flag of their own here, which --set may not set either.
OWN_FLAGS = BLOCK_FIELDS + ("lr", "mixture", "pack_tasks", "seed")
DEPTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# Bumped when the evaluation records more (2: strict recall, gates): older caches are redone.
EVAL_VERSION = 2
# --recipes: NSA trained with each aid to selection learning (docs/selection_learning.md), and
# with all of them ("combined"); --set applies on top of every recipe.
RECIPES = {"baseline": [], "max": ["group_score=max"], "distill": ["select_distill=0.5"],
           "distill_s8": ["select_distill=0.5", "select_distill_stride=8"],
           "st": ["select_gate=straight_through"],
           "combined": ["group_score=max", "select_distill=0.5", "select_gate=straight_through"]}
# train_s counts the training steps only; data, evaluation and checkpoints take the rest
# of a call's wall time. A run segment gets this share of the time left.
STEP_SHARE = 0.8


@dataclasses.dataclass(frozen=True)
class Stage:
  seq_len: int
  batch_size: int
  steps: int


def parse_stages(spec: str) -> list[Stage]:
  """"512x64:600,4096x8:800" -> stages of (seq_len, batch_size, steps)."""
  stages = []
  for item in spec.split(","):
    try:
      shape, steps = item.split(":")
      seq_len, batch = shape.split("x")
      stages.append(Stage(int(seq_len), int(batch), int(steps)))
    except ValueError:
      raise ValueError(f"stage {item!r} of --stages={spec!r} is not SEQ_LENxBATCH:STEPS") from None
  return stages


def parse_blocks(spec: str) -> dict:
  """"16,8,32,8,64" -> NSAConfig overrides by name (BLOCK_FIELDS); "" -> none (the preset's)."""
  if not spec:
    return {}
  values = spec.split(",")
  if len(values) != len(BLOCK_FIELDS) or not all(v.isdigit() for v in values):
    raise ValueError(f"--nsa_blocks={spec!r} must be {len(BLOCK_FIELDS)} integers: "
                     + ",".join(BLOCK_FIELDS))
  return dict(zip(BLOCK_FIELDS, map(int, values)))


def parse_settings(preset: str, settings: list[str]) -> dict:
  """["num_kv_heads=8", "lr=1e-3"] -> {"num_kv_heads": 8, "lr": 0.001}: fields of the
  preset's TrainConfig by flag name (`python -m experiments.train --help`), typed as the flags."""
  argv = []
  for item in settings:
    name, eq, value = item.partition("=")
    if not eq or not name:
      raise ValueError(f"--set {item!r} is not NAME=VALUE")
    if name in STAGE_FIELDS + OWN_FLAGS:
      raise ValueError(f"--set {item!r}: {name} has a flag of its own here (--help)"
                       if name in OWN_FLAGS else
                       f"--set {item!r}: {name} is set per stage (--stages)")
    argv += [f"--{name}", value]
  settings = vars(build_parser(PRESETS[preset].config, True).parse_args(argv))
  settings.pop("preset")   # the parser's own flag, None here
  return settings


def stage_config(args, attention: str, i: int, stages: list[Stage], time_limit_s: float = 0.0):
  """Stage i's TrainConfig: warmup to --lr, constant, decaying (cosine) only in the last stage;
  a distill_warmup_steps (--set) ramps the distillation weight up in the first stage only."""
  stage = stages[i]
  overrides = {k: v for k, v in args.overrides.items() if i == 0 or k != "distill_warmup_steps"}
  return make_config(
      args.preset, attention=attention, out=str(args.runs / attention / f"stage{i}-{stage.seq_len}"),
      seq_len=stage.seq_len, batch_size=stage.batch_size, steps=stage.steps, lr=args.lr,
      warmup_steps=min(args.warmup_steps, stage.steps - 1),
      min_lr_ratio=0.1 if i == len(stages) - 1 else 1.0, mixture=args.mixture, pack=True,
      pack_tasks=args.pack_tasks, text_weight=args.text_row_weight / stage.seq_len,
      eval_every=stage.steps, eval_batches=2,
      ckpt_every=max(1, min(100, stage.steps)), keep_checkpoints=2, time_limit_s=time_limit_s,
      progress=sys.stderr.isatty() and not args.small, **overrides)


def progress(run_dir: pathlib.Path) -> tuple[int | None, float]:
  """(latest checkpointed step or None, its cumulative training seconds)."""
  manager = checkpoint_manager(run_dir)
  step = manager.latest_step()
  train_s = 0.0 if step is None else manager.restore(
      step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]["train_s"]
  manager.close()
  return step, train_s


def seed_from(previous_dir: pathlib.Path, cfg) -> None:
  """Starts stage `cfg` from the final parameters of the stage before: a step-0 checkpoint
  with those parameters, a fresh optimizer and the loader at its start."""
  model, _, _ = load_model(previous_dir)
  manager = checkpoint_manager(cfg.out_dir, cfg.keep_checkpoints)
  save_checkpoint(manager, 0, model, make_optimizer(model, cfg),
                  data.Loader(cfg.mixture, **cfg.data_options()), cfg, 0.0)
  manager.wait_until_finished()
  manager.close()


def train_stages(args, stages: list[Stage], left) -> bool:
  """Trains what is left of every stage of NSA, then of full attention (those of
  --attentions); False when the time ran out first."""
  for attention in args.attentions:
    for i, stage in enumerate(stages):
      cfg = stage_config(args, attention, i, stages)
      step, train_s = progress(cfg.out_dir)
      if step == stage.steps:
        continue
      if args.budget_s and left() < args.min_segment_s:
        return False
      if step is None and i > 0:
        seed_from(stage_config(args, attention, i - 1, stages).out_dir, cfg)
      limit = train_s + STEP_SHARE * (left() - args.stop_reserve_s) if args.budget_s else 0.0
      print(f"{attention}, stage {i + 1}/{len(stages)} ({stage.seq_len} x {stage.batch_size}): "
            f"from step {step or 0} of {stage.steps}", flush=True)
      train(stage_config(args, attention, i, stages, limit))
      if progress(cfg.out_dir)[0] < stage.steps:
        return False
  return True


def evaluate(args, stages: list[Stage], attention: str, lengths, left) -> dict | None:
  """The model's retrieval after the last stage (cached next to its run); None when the
  time left is short of --eval_reserve_s."""
  run_dir = stage_config(args, attention, len(stages) - 1, stages).out_dir
  cache = run_dir / "retrieval_eval.json"
  key = {"step": stages[-1].steps, "lengths": lengths, "depths": list(DEPTHS),
         "samples": args.samples, "version": EVAL_VERSION}
  if cache.exists() and json.loads(cache.read_text())["key"] == key:
    return json.loads(cache.read_text())["result"]
  if args.budget_s and left() < args.eval_reserve_s:
    return None
  model, cfg, _ = load_model(run_dir)
  result = passkey_probe(model, lengths, DEPTHS, samples=args.samples,
                         batch_size=args.eval_batch, seed=cfg.seed,
                         record=(cfg.seq_len, DEPTHS[len(DEPTHS) // 2]))
  cache.write_text(json.dumps({"key": key, "result": result}))
  return result


def summary(args, stages: list[Stage], attention: str, probe: dict) -> dict:
  """Everything the report needs of one model: tokens, steps, per-stage speed and validation."""
  per_stage = []
  for i, stage in enumerate(stages):
    s = summarize(read_metrics(stage_config(args, attention, i, stages).out_dir))
    per_stage.append({"seq_len": stage.seq_len, "batch_size": stage.batch_size,
                      "steps": s["steps"], "train_s": s["train_s"],
                      "first_step_s": s["first_step_s"],
                      "tokens_per_s_median": s["tokens_per_s_median"],
                      "val": {k: v["loss"][-1] for k, v in s["val"].items()}})
  return {"train_len": stages[-1].seq_len,
          "tokens": sum(s.steps * s.batch_size * s.seq_len for s in stages),
          "steps": sum(s.steps for s in stages),
          "train_s": sum(s["train_s"] for s in per_stage),
          "val": per_stage[-1]["val"], "stages": per_stage, **probe}


def copy_metrics(args, stages: list[Stage], prefix: str = "") -> None:
  """Every stage's metrics.csv so far to <out>/retrieval_metrics/ (progress, even mid-way),
  named <prefix><attention>_stage<i>-<seq_len>.csv."""
  dest = pathlib.Path(args.out) / "retrieval_metrics"
  for i in range(len(stages)):
    for attention in args.attentions:
      csv = stage_config(args, attention, i, stages).out_dir / "metrics.csv"
      if csv.exists():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(csv, dest / f"{prefix}{attention}_stage{i}-{stages[i].seq_len}.csv")


def file_suffix(args) -> str:
  """"_<gpu>" (none with --small), "_<tag>" with --tag, and "_seed<N>" for a --seed other
  than 0."""
  return (("" if args.small else "_" + bench_common.slug(bench_common.gpu_name()))
          + (f"_{args.tag}" if args.tag else "") + (f"_seed{args.seed}" if args.seed else ""))


def common_record(args, stages) -> dict:
  """What every run of this call shares: device, data, curriculum, model shape."""
  mc = stage_config(args, "nsa", len(stages) - 1, stages).model
  return {"device": bench_common.gpu_name(), "preset": args.preset, "mixture": args.mixture,
          "pack_tasks": args.pack_tasks, "text_row_weight": args.text_row_weight,
          "lr": args.lr, "seed": args.seed, "settings": args.set, "dtype": mc.dtype,
          "stages": [dataclasses.asdict(s) for s in stages],
          "model": {k: getattr(mc, k) for k in ("d_model", "num_layers", "num_heads",
                                                "num_kv_heads", "head_dim")},
          "nsa_config": dataclasses.asdict(mc.nsa), **({"tag": args.tag} if args.tag else {})}


def write_results(args, stages, results: dict, **extra) -> None:
  """The JSON (with `extra` fields), the heatmaps of the models trained (NSA's recall last)
  and NSA's example."""
  # A run of some of the models is named apart ("retrieval-nsa_<gpu>"): the README's section
  # (experiments/report.py) renders the comparisons, retrieval_<gpu>.json, and needs both.
  name = ("retrieval" + ("" if len(results) == len(ATTENTIONS) else "-" + "-".join(results))
          + file_suffix(args))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  record = {**common_record(args, stages), **extra, "runs": results}
  bench_common.write_json(str(out / f"{name}.json"), record)
  nsa_panels = retrieval_panels(results["nsa"], "NSA") if "nsa" in results else []
  full_panels = retrieval_panels(results["full"], "full attention") if "full" in results else []
  first = next(iter(results.values()))
  plot_heatmaps(out / f"{name}.png", [*nsa_panels[:1], *full_panels, *nsa_panels[1:]],
                first["lengths"], first["depths"],
                f"passkey retrieval after {first['tokens']:,} training tokens, trained up to "
                f"{first['train_len']} tokens ({record['device']})")
  print(f"wrote {out / name}.json and {out / name}.png")
  if "nsa" not in results:
    return
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(11, 4))
  draw_example(ax, results["nsa"]["example"])
  fig.tight_layout()
  fig.savefig(out / f"{name}_example.png", dpi=120)
  plt.close(fig)
  print(f"wrote {out / name}_example.png")


def recipe_args(args, recipe: str):
  """`args` for NSA trained with `recipe` (RECIPES, on top of --set) under <runs>/<recipe>;
  the baseline, which adds nothing, is the comparison's NSA run under <runs> (the same model,
  not trained twice), as full attention is."""
  settings = args.set + RECIPES[recipe]
  return argparse.Namespace(**{
      **vars(args), "set": settings, "runs": args.runs / recipe if RECIPES[recipe] else args.runs,
      "attentions": ["nsa"],
      "overrides": {**args.overrides, **parse_settings(args.preset, settings)}})


def merged_ablations(args, stages: list[Stage]) -> dict:
  """The recipes (and full attention) of the --merge files, earlier calls of the same
  ablation: {"recipes": {...}, "full": ... or None}. A file whose experiment differs from
  this call's (any field of `common_record` but the device) is an error naming the field."""
  mine = common_record(args, stages)
  merged = {"recipes": {}, "full": None}
  for path in args.merge:
    earlier = json.loads(pathlib.Path(path).read_text())
    differ = [k for k in mine if k != "device" and earlier.get(k) != mine[k]]
    if differ:
      raise ValueError(f"--merge {path}: not this experiment: {differ[0]}="
                       f"{earlier.get(differ[0])!r} there, {mine[differ[0]]!r} here")
    merged["recipes"].update(earlier["recipes"])
    merged["full"] = earlier.get("full") or merged["full"]
  return merged


def ablation(args, stages: list[Stage], lengths, left) -> bool:
  """NSA with each of --recipes (and full attention, if in --attentions) on the same
  tokens, beside those of the --merge files: retrieval_ablation_<gpu>.json, and the
  comparison retrieval_<gpu>.json of full attention with the winner (the best mean accuracy
  over the lengths and depths, then the best strict recall). False when the time ran out
  first."""
  earlier = merged_ablations(args, stages)   # a wrong file fails before any training
  runs = {}
  for recipe in args.recipes:
    rargs = recipe_args(args, recipe)
    if not train_stages(rargs, stages, left):
      return False
    copy_metrics(rargs, stages, prefix=f"{recipe}_")
    probe = evaluate(rargs, stages, "nsa", lengths, left)
    if probe is None:
      return False
    runs[recipe] = {"settings": rargs.set, **summary(rargs, stages, "nsa", probe)}
  full = None
  if "full" in args.attentions:
    fargs = argparse.Namespace(**{**vars(args), "attentions": ["full"]})
    if not train_stages(fargs, stages, left):
      return False
    copy_metrics(fargs, stages)
    probe = evaluate(fargs, stages, "full", lengths, left)
    if probe is None:
      return False
    full = summary(fargs, stages, "full", probe)
  runs = {**earlier["recipes"], **runs}
  full = full or earlier["full"]
  score = lambda r: (np.mean(r[1]["accuracy"]),
                     np.mean(r[1]["selection_recall"]["strict"]["mean"]))
  winner = max(runs.items(), key=score)[0]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"retrieval_ablation{file_suffix(args)}.json"
  bench_common.write_json(str(path), {**common_record(args, stages), "winner": winner,
                                      "recipes": runs, **({"full": full} if full else {}),
                                      **({"merged": args.merge} if args.merge else {})})
  print_ablation(runs, full)
  print(f"winner: {winner} ({' '.join(runs[winner]['settings']) or 'no settings'})")
  if full is not None:
    write_results(recipe_args(args, winner), stages, {"nsa": runs[winner], "full": full},
                  recipe=winner)
  return True


def print_ablation(runs: dict, full: dict | None) -> None:
  """One row per recipe: accuracy per length (mean over depths), recall and strict recall
  at the training length (mean over depths; strict over layers >= 1) with their chance,
  and the final validation losses."""
  first = next(iter(runs.values()))
  at = first["lengths"].index(first["train_len"]) if first["train_len"] in first["lengths"] else -1
  tasks = sorted(first["val"])
  print("\nrecipe      " + " ".join(f"{f'acc@{n}':>9}" for n in first["lengths"])
        + f" {'recall':>13} {'strict':>13} " + " ".join(f"{t:>11}" for t in tasks))
  rows = [*runs.items(), *([("full", full)] if full else [])]
  for name, r in rows:
    cells = " ".join(f"{np.mean(a):>9.2f}" for a in r["accuracy"])
    rec = r.get("selection_recall")
    pair = lambda d: f"{np.mean(d['mean'][at]):.2f} / {np.mean(d['chance'][at]):.2f}"
    recall = (f"{pair(rec):>13} {pair(rec['strict']):>13}" if rec else f"{'–':>13} {'–':>13}")
    print(f"{name:<11} {cells} {recall} " + " ".join(f"{r['val'][t]:>11.4f}" for t in tasks))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=bench_common.default_out_dir(),
                      help="where the JSON and PNGs go (default $OUT or experiments/results)")
  parser.add_argument("--runs", default="runs/retrieval",
                      help="checkpoints and metrics of both models, resumed by the next call")
  parser.add_argument("--small", action="store_true",
                      help="CPU smoke test: preset tiny, two short stages, a small grid")
  parser.add_argument("--preset")
  parser.add_argument("--stages", help=f"SEQ_LENxBATCH:STEPS,... (default {GPU['stages']})")
  parser.add_argument("--mixture", default="passkey:0.8,text:0.2",
                      help="share of the rows of each task")
  parser.add_argument("--text_row_weight", type=float, default=8.0,
                      help="loss weight of a whole text row, spread over its tokens (an answer "
                      "token weighs 1: a passkey row 5, an mqar row 32)")
  parser.add_argument("--nsa_blocks",
                      help="NSA's " + ",".join(BLOCK_FIELDS) + f" (both models pack rows to "
                      f"select_block; default {GPU['nsa_blocks']}; '' keeps the preset's)")
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                      help="any other field of the preset's configuration by its flag name "
                      "(python -m experiments.train --help), e.g. --set num_kv_heads=8; "
                      "repeatable; applies to both models")
  parser.add_argument("--attentions", default=",".join(ATTENTIONS),
                      help="the models to train and evaluate, e.g. nsa alone to try an NSA "
                      "recipe (its results: retrieval-nsa_<gpu>.json, beside the comparisons)")
  parser.add_argument("--recipes",
                      help="ablation: NSA trained with each of these recipes (comma-separated, "
                      f"of {', '.join(RECIPES)}) under <runs>/<recipe>, and full attention "
                      "if in --attentions: retrieval_ablation_<gpu>.json, and the comparison "
                      "retrieval_<gpu>.json with the winner")
  parser.add_argument("--merge", default="", metavar="JSON[,JSON]",
                      help="ablation: earlier calls' retrieval_ablation_<gpu>.json of the same "
                      "experiment (same data, curriculum, model, seed); their recipes and full "
                      "attention join this call's in the table and the winner's choice")
  parser.add_argument("--seed", type=int, default=0,
                      help="parameters, data order and passkeys (e.g. to repeat the winner); "
                      "not 0: runs under <runs>/seed<N>, files named *_seed<N>")
  parser.add_argument("--tag", default="",
                      help="names an experiment apart from the default one (other blocks or "
                      "stages): runs under <runs>/<tag>, files named *_<tag>")
  parser.add_argument("--pack_tasks", action="store_true",
                      help="several passkey/mqar examples a row, each a document of its own "
                      "(the models read segment_ids)")
  parser.add_argument("--warmup_steps", type=int, default=30, help="per stage")
  parser.add_argument("--lengths", help=f"evaluation lengths (default {GPU['lengths']})")
  parser.add_argument("--samples", type=int, help="passkeys per (length, depth) cell")
  parser.add_argument("--eval_batch", type=int, default=16)
  parser.add_argument("--budget_s", type=float,
                      help="wall seconds this call may take (0: no limit; default 540)")
  parser.add_argument("--min_segment_s", type=float, default=60.0,
                      help="start no training segment with less time left")
  parser.add_argument("--stop_reserve_s", type=float, default=40.0,
                      help="time kept for a segment's final evaluation and checkpoint")
  parser.add_argument("--eval_reserve_s", type=float, default=100.0,
                      help="start no model's retrieval evaluation with less time left")
  args = parser.parse_args(argv)
  start = time.monotonic()
  for key, value in (SMALL if args.small else GPU).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if not re.fullmatch(r"[A-Za-z0-9-]*", args.tag):
    parser.error(f"--tag {args.tag!r}: letters, digits and '-' only (it goes into file names)")
  args.runs = pathlib.Path(args.runs) / args.tag / (f"seed{args.seed}" if args.seed else "")
  args.attentions = args.attentions.split(",")
  if not set(args.attentions) <= set(ATTENTIONS):
    raise ValueError(f"--attentions={','.join(args.attentions)} must name some of {ATTENTIONS}")
  args.recipes = args.recipes.split(",") if args.recipes else []
  args.merge = [p for p in args.merge.split(",") if p]
  missing = [p for p in args.merge if not pathlib.Path(p).is_file()]
  if missing or (args.merge and not args.recipes):
    raise ValueError(f"--merge {','.join(missing)}: no such file" if missing else
                     "--merge needs --recipes (it merges ablations)")
  unknown = [r for r in args.recipes if r not in RECIPES]
  if unknown:
    raise ValueError(f"--recipes: {','.join(unknown)} not among {', '.join(RECIPES)}")
  # --nsa_blocks and --set, parsed once: a wrong name or value fails before any training.
  args.overrides = {**parse_blocks(args.nsa_blocks), **parse_settings(args.preset, args.set),
                    "seed": args.seed}
  if not args.small:   # so that the next call does not compile the same steps again
    jax.config.update("jax_compilation_cache_dir", str((args.runs / "jax_cache").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  stages = parse_stages(args.stages)
  lengths = [int(n) for n in args.lengths.split(",")]
  left = lambda: args.budget_s - (time.monotonic() - start)
  tokens = sum(s.steps * s.batch_size * s.seq_len for s in stages)
  print(f"{len(stages)} stages, {tokens:,} tokens per model "
        f"({', '.join(f'{s.seq_len} x {s.batch_size} x {s.steps}' for s in stages)}); "
        f"checkpoints under {args.runs}"
        + (f"; this call stops after {args.budget_s:.0f} s" if args.budget_s else ""), flush=True)
  if args.recipes:
    if not ablation(args, stages, lengths, left):
      print(f"time budget spent after {time.monotonic() - start:.0f} s: run the same command "
            f"again to continue from the checkpoints under {args.runs}")
      return
    print(f"done in {time.monotonic() - start:.0f} s")
    return
  done = train_stages(args, stages, left)
  copy_metrics(args, stages)
  probes = {a: evaluate(args, stages, a, lengths, left) for a in args.attentions} if done else {}
  if not done or any(p is None for p in probes.values()):
    print(f"time budget spent after {time.monotonic() - start:.0f} s: run the same command "
          f"again to continue from the checkpoints under {args.runs}")
    return
  results = {a: summary(args, stages, a, p) for a, p in probes.items()}
  write_results(args, stages, results)
  for attention, r in results.items():
    print(f"\n{attention}: {r['steps']} steps, {r['tokens']:,} tokens, {r['train_s']:.0f} s "
          f"training; final validation " + ", ".join(f"{k} {v:.3f}" for k, v in r["val"].items()))
    print_tables(r)
  print(f"done in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
  main()
