"""Model-level benchmark: the training step of NSA vs full attention (docs/benchmarks.md).

One process, one GPU: for each preset (`research`, `gpu-compare`) and T in 8k..64k at
--tokens (65536) per step, the same model with `attention="nsa"` and `attention="full"`
takes `nsa_jax.train_lib`'s training step on the same random tokens: compiled ahead of
time, then the median of --steps (>= 20); the loss must stay near ln 256, else exit 1.

    python experiments/bench_train.py                         # ~7-8 min on one H200
    python experiments/bench_train.py --presets research --seq-lens 8192,32768
    python experiments/bench_train.py --breakdown --seq-lens 8192   # research preset
    python experiments/bench_train.py --packed 4096    # also on rows packed with 4k documents
    python experiments/bench_train.py --small [--breakdown]   # CPU smoke test, tiny preset

Writes bench_train_<gpu>.json and .png (tokens/s vs T) to --out (default $OUT, else
experiments/results), and with --breakdown train_breakdown_<preset>_<T>_<gpu>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import bench_common as bc   # also puts the repo root on sys.path
import bench_kernels
from nsa_jax import sharding
from nsa_jax.model import Transformer, count_params
from nsa_jax.module import compressed_positions, compression_blocks
from nsa_jax.rope import apply_rope
from nsa_jax.train_config import TrainConfig, make_config
from nsa_jax.train_lib import make_optimizer, make_steps

ATTENTIONS = ("nsa", "full")
LOSS_RANGE = (0.9 * math.log(256), 1.1 * math.log(256))   # random bytes: ~ln 256 per token
GIB = 2 ** 30


def random_batches(batch_size: int, seq_len: int, n: int = 3, seed: int = 0,
                   document: int | None = None) -> list[dict]:
  """`n` batches of random bytes, {"inputs", "targets", "weights"} like nsa_jax.data's; with
  `document`, packed rows: documents of `document` tokens (the last what is left) and their
  "segment_ids" (`document` a multiple of select_block)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = rng.integers(0, 256, (batch_size, seq_len + 1), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "weights": np.ones((batch_size, seq_len), np.float32)}
    if document:
      lengths = bench_kernels.document_lengths(seq_len, document)
      ids = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
      batch["segment_ids"] = np.broadcast_to(ids, (batch_size, seq_len)).copy()
    out.append(batch)
  return out


def program_peak_gib(compiled) -> float | None:
  """Device memory of a compiled program at its peak (XLA's buffer assignment), in GiB."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return max(m.peak_memory_in_bytes, total) / GIB


def time_train_step(cfg: TrainConfig, batch_size: int, *, steps: int = 20, warmup: int = 2,
                    mesh=None, document: int | None = None) -> dict:
  """`train_lib`'s training step of `cfg.model` on random tokens: compile_s (AOT), peak_gib of
  the program, median step_ms over `steps` steps after `warmup` (state threaded through, as in
  training), tokens_per_s, the first and last losses, parameters. With `mesh`, the model,
  optimizer state and batches are sharded over it (nsa_jax.sharding); with `document`, the
  rows are packed with documents of that many tokens (`random_batches`)."""
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  optimizer = make_optimizer(model, cfg)
  place = lambda b: b
  if mesh is not None:
    sharding.shard_model_and_optimizer(model, optimizer, mesh)
    place = lambda b: sharding.shard_batch(b, mesh)
  batches = [place(b) for b in random_batches(batch_size, cfg.seq_len, document=document)]
  graphdef, state = nnx.split((model, optimizer))
  start = time.perf_counter()
  lowered = make_steps(graphdef)[0].lower(state, batches[0])
  lower_s = time.perf_counter() - start      # tracing and lowering (Python, Pallas -> Triton IR)
  step = lowered.compile()                   # then XLA (fusions, autotuning, Triton, cuDNN)
  compile_s = time.perf_counter() - start
  times, losses = [], []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
    losses.append(metrics["loss"])
  step_s = statistics.median(times[warmup:])
  return {"step_ms": 1e3 * step_s, "min_ms": 1e3 * min(times[warmup:]),
          "tokens_per_s": batch_size * cfg.seq_len / step_s, "compile_s": compile_s,
          "lower_s": lower_s,
          "peak_gib": program_peak_gib(step), "n_steps": steps,
          "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
          "params": count_params(model)}


def check(row: dict) -> str | None:
  """Why a timed row is wrong, or None: both losses finite and near ln 256."""
  lo, hi = LOSS_RANGE
  for key in ("loss_first", "loss_last"):
    if not lo < row[key] < hi:
      return f"{key}={row[key]} is not in ({lo:.2f}, {hi:.2f}) (random bytes: ln 256)"
  return None


def case_config(preset: str, seq_len: int, attention: str, small: bool) -> TrainConfig:
  """The preset at `seq_len` with `attention`; --small: the reference ops (CPU)."""
  kw = dict(impl="xla") if small else {}
  return make_config(preset, seq_len=seq_len, attention=attention, mixture="text",
                     progress=False, **kw)


def run_cases(args) -> list[dict]:
  """Every (preset, T) case, NSA then full; with --packed, the same on packed rows next."""
  deadline = time.perf_counter() + args.budget_s
  rows = []
  for preset in args.presets:
    for T in args.seq_lens:
      batch = max(1, args.tokens // T)
      for document in (None, args.packed) if args.packed else (None,):
        for attention in ATTENTIONS:
          row = {"preset": preset, "seq_len": T, "batch_size": batch, "attention": attention,
                 "document": document}
          if time.perf_counter() > deadline:
            row["skipped"] = "time budget spent"
          else:
            try:
              row |= time_train_step(case_config(preset, T, attention, args.small), batch,
                                     steps=args.steps, document=document)
              row["check"] = check(row) or "ok"
            except Exception as err:   # an OOM or a failed compile: recorded, the run goes on
              row["error"] = bc.describe_error(err)
            gc.collect()
          rows.append(row)
          what = (f"{row['tokens_per_s']:,.0f} tokens/s, {row['step_ms']:.1f} ms/step, compile "
                  f"{row['compile_s']:.1f} s ({row['lower_s']:.1f} s tracing and lowering), "
                  f"peak {row['peak_gib'] or 0:.1f} GiB, loss "
                  f"{row['loss_first']:.3f} -> {row['loss_last']:.3f} ({row['check']})"
                  if "step_ms" in row else row.get("error") or row.get("skipped"))
          data = f", packed {document}" if document else ""
          print(f"[{preset} T={T} B={batch}{data}] {attention}: {what}", flush=True)
  return rows


def cases(rows: list[dict]) -> list[tuple]:
  """The (preset, T, document) cases of `rows`, in order."""
  return list(dict.fromkeys((r["preset"], r["seq_len"], r.get("document")) for r in rows))


def ratio_rows(rows: list[dict]) -> list[list]:
  """One line per (preset, T): NSA and full side by side."""
  by = {(r["preset"], r["seq_len"], r.get("document"), r["attention"]): r for r in rows}
  out = []
  for preset, T, document in cases(rows):
    n, f = by.get((preset, T, document, "nsa"), {}), by.get((preset, T, document, "full"), {})
    ratio = lambda a, b: a / b if a and b else None
    tokens = lambda r: round(r["tokens_per_s"]) if "tokens_per_s" in r else None
    out.append([preset, T, document or "-", n.get("batch_size"), tokens(n), tokens(f),
                ratio(n.get("tokens_per_s"), f.get("tokens_per_s")), n.get("step_ms"),
                f.get("step_ms"), n.get("compile_s"), f.get("compile_s"),
                ratio(n.get("compile_s"), f.get("compile_s")), n.get("peak_gib"),
                f.get("peak_gib")])
  return out


def plot(rows: list[dict], path: str) -> None:
  """One panel per preset and data (random rows; packed rows: full attention then runs
  on the Pallas kernel, cuDNN takes no segment ids)."""
  panels = {}
  for preset, document in dict.fromkeys((p, d) for p, _, d in cases(rows)):
    full = "full (Pallas, segment ids)" if document else "full (cuDNN)"
    series = {}
    for attention, label in (("full", full), ("nsa", "NSA")):
      pts = sorted((r["seq_len"], r["tokens_per_s"]) for r in rows
                   if (r["preset"], r.get("document"), r["attention"]) == (preset, document,
                                                                          attention)
                   and "tokens_per_s" in r)
      if pts:
        series[label] = tuple(zip(*pts))
    if "NSA" in series and full in series:   # ratio labels need the same T list
      by_T = dict(zip(*series[full]))
      series[full] = (series["NSA"][0], [by_T.get(T) for T in series["NSA"][0]])
    # Labels at full's points: NSA tokens/s / full tokens/s (above 1: NSA trains faster).
    data = f", documents of {document} tokens" if document else ""
    panels[f"{preset}{data}: training step, labels NSA / full"] = {
        "series": series, "ratios": [(full, "NSA")]}
  if panels:
    bc.plot_loglog(path, panels, ylabel="tokens / s")


# ----------------------------------------------------------------------------
# --breakdown: where one training step's time goes.


def fwd_bwd(fn, *args, n_iter: int) -> dict:
  """Times forward+backward of fn(*args) w.r.t. all args (arrays or NNX states), driven by a
  random cotangent drawn per run (bench_common.forward_backward)."""
  out = jax.eval_shape(fn, *args)

  def make(key):
    leaves, tree = jax.tree.flatten(out)
    keys = jax.random.split(key, len(leaves))
    cot = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return (*args, jax.tree.unflatten(tree, cot))
  return bc.try_time_fn(bc.forward_backward(fn, len(args)), make, n_iter=n_iter)


def applied(module, f):
  """(fn(state, *xs), state): `f(module, *xs)` as a function of the module's state, so that its
  parameters get gradients."""
  graphdef, state = nnx.split(module)
  return (lambda state, *xs: f(nnx.merge(graphdef, state), *xs)), state


def layer_parts(layer, x, n_iter: int) -> list[tuple[str, dict]]:
  """The NSA layer's work outside the nsa op, each part forward+backward on its own."""
  B, T, _ = x.shape
  kv = layer.branch_kv(x)
  k_raw, v_raw = kv["cmp"]
  inp = layer.branch_inputs(x)
  o = jax.random.normal(jax.random.key(3), inp["q"].shape[:3] + (layer.dv,), x.dtype)
  pos = jnp.arange(T)
  parts = [
      ("q/kv projections", applied(layer, lambda m, x: (m.q_proj(x), m.kv_proj(x))), (x,)),
      ("compression MLP phi (k, v)",
       applied(layer, lambda m, k, v: (m.phi_k(compression_blocks(k, m.config)),
                                       m.phi_v(compression_blocks(v, m.config)))),
       (k_raw, v_raw)),
      ("RoPE (q, k_slc, k_win, k_cmp)",
       ((lambda q, k1, k2, kc: (apply_rope(q, pos), apply_rope(k1, pos), apply_rope(k2, pos),
                                apply_rope(kc, compressed_positions(kc.shape[1], layer.config)))),
        None),
       (inp["q"], kv["slc"][0], kv["win"][0], inp["k_cmp"])),
      ("gates", applied(layer, lambda m, x: jax.nn.sigmoid(m.gate(x))), (x,)),
      ("output projection", applied(layer, lambda m, o: m.o_proj(o.reshape(B, T, -1))), (o,)),
  ]
  out = []
  for name, (fn, state), args in parts:
    args = args if state is None else (state, *args)
    out.append((name, fwd_bwd(fn, *args, n_iter=n_iter)))
  return out


def breakdown(args, preset: str, T: int) -> dict:
  """Times every part of one training step of `preset` at T; prints and returns the records."""
  batch = max(1, args.tokens // T)
  recs = []

  def record(part, attention, pass_, result):
    recs.append({"part": part, "attention": attention, "pass": pass_, **result})
    what = (f"{result['median_ms']:.3f} ms (compile {result['compile_s']:.1f} s)"
            if "median_ms" in result else result.get("error"))
    print(f"[{preset} T={T} B={batch}] {part} ({attention}) {pass_}: {what}", flush=True)

  cfgs = {a: case_config(preset, T, a, args.small) for a in ATTENTIONS}
  mc = cfgs["nsa"].model
  for attention, cfg in cfgs.items():
    step = time_train_step(cfg, batch, steps=args.steps)
    record("train step", attention, "fwd+bwd+update",
           {"median_ms": step["step_ms"], "compile_s": step["compile_s"],
            "peak_gib": step["peak_gib"]})
    one = dataclasses.replace(cfg.model, num_layers=1)
    layer = Transformer(one, rngs=nnx.Rngs(0)).blocks[0].attn
    x = jax.random.normal(jax.random.key(1), (batch, T, mc.d_model), mc.compute_dtype)
    fn, state = applied(layer, lambda m, x: m(x))
    record("attention layer", attention, "fwd+bwd", fwd_bwd(fn, state, x, n_iter=args.n_iter))
    if attention == "nsa":
      for part, result in layer_parts(layer, x, args.n_iter):
        record(part, "nsa", "fwd+bwd", result)

  # The ops alone, as bench_kernels times them (its shapes, impls and cuDNN choices).
  shape = bc.Shape(preset, B=batch, T=T, HQ=mc.num_heads, HKV=mc.num_kv_heads,
                   Dk=mc.head_size, Dv=mc.head_size)
  impls = bc.kernel_impls("pallas" if jax.default_backend() == "gpu" else "xla")
  for op, impl, pass_, fn, make in bench_kernels.nsa_cases(shape, mc.nsa, impls,
                                                           mc.compute_dtype, branches=True):
    record(f"op {op}", f"nsa ({impl})", pass_, bc.try_time_fn(fn, make, n_iter=args.n_iter))
  dense_impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  name, dense = bench_kernels.dense_candidates(shape, dense_impl)[0]
  make = lambda key: bench_kernels.dense_inputs(shape, mc.compute_dtype, key)
  record("op dense attention", f"full ({dense_impl}:{name})", "fwd+bwd",
         bc.try_time_fn(bc.forward_backward(dense, 3), make, n_iter=args.n_iter))

  # The top device ops of one NSA training step.
  model = Transformer(mc, rngs=nnx.Rngs(0))
  optimizer = make_optimizer(model, cfgs["nsa"])
  graphdef, state = nnx.split((model, optimizer))
  train_step, held = make_steps(graphdef)[0], [state]

  def step(batch):   # the step donates its state: thread it through the runs
    held[0], metrics = train_step(held[0], batch)
    return metrics
  top = bc.device_op_times(step, random_batches(batch, T, n=1)[0], runs=3)[:args.top]
  for name, us, count in top:
    print(f"  {us / 1e3:8.3f} ms  x{count:<4d} {name[:110]}")
  return {"preset": preset, "seq_len": T, "batch_size": batch, "num_layers": mc.num_layers,
          "records": recs, "top_device_ops": [{"name": n, "ms": us / 1e3, "count": c}
                                              for n, us, c in top]}


def breakdown_table(result: dict) -> None:
  """Per-layer view: each part's ms and its share of the NSA layer."""
  get = lambda part, att: next((r.get("median_ms") for r in result["records"]
                                if r["part"] == part and r["attention"].startswith(att)
                                and r["pass"] != "fwd"), None)
  layer = get("attention layer", "nsa")
  rows = [[r["part"], r["attention"], r["pass"], r.get("median_ms"),
           r["median_ms"] / layer if layer and r.get("median_ms") else None]
          for r in result["records"]]
  print(f"\n{result['preset']} T={result['seq_len']} B={result['batch_size']} "
        f"({result['num_layers']} layers); share = ms / NSA layer fwd+bwd")
  bc.print_table(["part", "attention", "pass", "ms", "share"], rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default="research,gpu-compare",
                      help="in this order (--budget-s cuts the last cases); --breakdown: "
                           "default research")
  parser.add_argument("--seq-lens", default="8192,16384,32768,65536",
                      help="--breakdown: default 8192")
  parser.add_argument("--tokens", type=int, default=65536,
                      help="tokens per step: batch = tokens // T (at least 1)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per case (>= 20)")
  parser.add_argument("--packed", type=int, default=0, metavar="TOKENS",
                      help="also time every case on packed rows: documents of TOKENS tokens "
                           "(a multiple of select_block), segment ids through the model "
                           "(packed rows); full attention then runs on the Pallas kernel")
  parser.add_argument("--n-iter", type=int, default=10, help="--breakdown: runs per part")
  parser.add_argument("--top", type=int, default=25, help="--breakdown: device ops listed")
  parser.add_argument("--budget-s", type=float, default=480.0,
                      help="start no new case after this many seconds")
  parser.add_argument("--breakdown", action="store_true",
                      help="where one step's time goes: the step, one attention layer, the "
                           "op, its branches, the layer's other parts, the top device ops")
  parser.add_argument("--small", action="store_true",
                      help="CPU smoke test: defaults preset tiny, T = 160, 320 (--breakdown: "
                           "160), 320 tokens a step")
  parser.add_argument("--out", default=bc.default_out_dir())
  given = sys.argv[1:] if argv is None else argv
  if "--breakdown" in given:
    parser.set_defaults(presets="research", seq_lens="8192")
  if "--small" in given:
    parser.set_defaults(presets="tiny", tokens=320,
                        seq_lens="160" if "--breakdown" in given else "160,320")
  args = parser.parse_args(argv)
  args.presets = args.presets.split(",")
  args.seq_lens = [int(t) for t in args.seq_lens.split(",")]
  if args.steps < 20:
    parser.error(f"--steps={args.steps} must be >= 20 (docs/benchmarks.md#model-level)")
  for preset in args.presets if args.packed else ():
    block = make_config(preset).model.nsa.select_block
    if args.packed % block:
      parser.error(f"--packed={args.packed} must be a multiple of preset {preset}'s "
                   f"select_block={block} (documents start on selection blocks: "
                   f"docs/semantics.md#packed-rows)")
  start = time.perf_counter()
  print(f"device {bc.gpu_name()}, jax {jax.__version__}", flush=True)
  gpu = bc.slug(bc.gpu_name())

  if args.breakdown:
    for preset in args.presets:
      for T in args.seq_lens:
        result = breakdown(args, preset, T)
        bc.write_json(os.path.join(args.out, f"train_breakdown_{preset}_{T}_{gpu}.json"),
                      result)
        breakdown_table(result)
    print(f"wall {time.perf_counter() - start:.0f} s")
    return

  rows = run_cases(args)
  failed = [r for r in rows if r.get("error") or r.get("check", "ok") != "ok"]
  name = f"bench_train_{gpu}"
  bc.write_json(os.path.join(args.out, name + ".json"), {
      "tokens_per_step": args.tokens, "steps": args.steps,
      "packed": "rows with a document: packed rows of documents of that many tokens, "
                "segment ids through the model; full attention on the Pallas kernel",
      "models": {p: dataclasses.asdict(make_config(p).model) for p in args.presets},
      "peak": "compiled program: XLA buffer assignment (arguments, outputs, temporaries)",
      "wall_s": time.perf_counter() - start, "rows": rows})
  plot(rows, os.path.join(args.out, name + ".png"))
  print(f"\nNSA vs full attention, training step ({args.tokens} tokens a step); "
        f"wall {time.perf_counter() - start:.0f} s, compiling "
        f"{sum(r.get('compile_s', 0) for r in rows):.0f} s of it")
  bc.print_table(["preset", "T", "packed", "B", "nsa tok/s", "full tok/s", "nsa/full", "nsa ms",
                  "full ms", "nsa compile s", "full compile s", "compile ratio", "nsa GiB",
                  "full GiB"], ratio_rows(rows))
  if failed:
    sys.exit(f"{len(failed)} case(s) failed: " + "; ".join(
        f"{r['preset']} T={r['seq_len']} {r['attention']}: {r.get('error') or r['check']}"
        for r in failed))


if __name__ == "__main__":
  main()
