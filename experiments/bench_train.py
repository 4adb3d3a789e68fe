"""Model-level benchmark: the training step of NSA vs full attention, one process per attempt,
on the `research` and `gpu-compare` presets at --tokens per step, with memory options tried
fastest to leanest. Method: docs/benchmarks.md#model-level.

    python -m experiments.bench_train --presets research --seq-lens 8192,16384,32768
    python -m experiments.bench_train --presets research --seq-lens 65536,131072 \
        --append experiments/results/bench_train_<gpu>.json    # rows added to that file's
    python -m experiments.bench_train --memory layer+scan       # one option for every case
    python -m experiments.bench_train --breakdown --seq-lens 8192   # research preset
    python -m experiments.bench_train --packed 4096    # also on rows packed with 4k documents
    python -m experiments.bench_train --distill 0.5 [--distill-stride 8]   # + NSA distilling
    python -m experiments.bench_train --small [--breakdown]   # CPU smoke test, tiny preset

Writes bench_train_<gpu>.json and .png (tokens/s and peak memory vs T) to --out (default
$OUT, else experiments/results); exits 1 when a loss strays from ln 256.
--breakdown (with the first --memory option) writes train_breakdown_<preset>_<T>_<gpu>.json.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import bench_common as bc
from experiments import bench_kernels
from experiments import report
from nsa_jax import sharding
from nsa_jax.model import REMATS, Transformer, count_params
from nsa_jax.module import compressed_positions, compression_blocks
from nsa_jax.rope import apply_rope
from nsa_jax.train_config import TrainConfig, make_config
from nsa_jax.train_lib import make_optimizer, make_steps

ATTENTIONS = ("nsa", "full")
DISTILL = "nsa+distill"   # --distill: NSA trained with the selection distillation loss
ATTENTION_OF = {"nsa": "nsa", "full": "full", DISTILL: "nsa"}
LOSS_RANGE = (0.9 * math.log(256), 1.1 * math.log(256))   # random bytes: ~ln 256 per token
GIB = 2 ** 30
SEQ_LENS = {"research": (8192, 16384, 32768, 65536, 131072)}   # other presets: DEFAULT_SEQ_LENS
DEFAULT_SEQ_LENS = (8192, 16384, 32768, 65536)
MEMORY_LADDER = "none,dots,layer,layer+scan"   # fastest expected first, leanest last
OOM = "out of memory"
# The allocator's settings the run must leave at JAX's defaults (recorded in the JSON).
MEMORY_ENV = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
              "XLA_PYTHON_CLIENT_ALLOCATOR")
XLA_PARTS = ("argument", "output", "temp", "alias", "generated_code")

# Persistent compilation cache events of this process (a listener below counts them).
CACHE_HIT, CACHE_WRITE = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
CACHE_EVENTS = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **_: CACHE_EVENTS.update([event]))


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


def program_memory(compiled) -> dict:
  """XLA's memory of a compiled program: peak_gib and its parts in bytes, xla_bytes."""
  m = compiled.memory_analysis()
  parts = m and {p: getattr(m, f"{p}_size_in_bytes") for p in XLA_PARTS}
  return {"peak_gib": program_peak_gib(compiled), "xla_bytes": parts}


def allocator_memory() -> dict:
  """The allocator's peak bytes in use by this process so far (on the first device) and its
  limit, in GiB; None where the backend keeps no statistics (the CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  gib = lambda key: stats[key] / GIB if key in stats else None
  return {"measured_peak_gib": gib("peak_bytes_in_use"), "pool_gib": gib("bytes_limit")}


def compile_step(cfg: TrainConfig, batch_size: int, *, mesh=None,
                 document: int | None = None) -> tuple:
  """`train_lib`'s training step of `cfg.model` on random tokens, compiled ahead of time:
  (step, state, batches, record), record: compile_s (trace + lower + compile), lower_s of it,
  compile_cache ("hit": read from the persistent compilation cache, "written": put in it,
  None: neither), XLA's memory of the program (`program_memory`), params. With `mesh`, the
  model, optimizer state and batches are sharded over it (nsa_jax.sharding); with `document`,
  the rows are packed with documents of that many tokens (`random_batches`)."""
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
  before = CACHE_EVENTS.copy()
  step = lowered.compile()                   # then XLA (fusions, autotuning, Triton, cuDNN)
  compile_s = time.perf_counter() - start
  cache = ("hit" if CACHE_EVENTS[CACHE_HIT] > before[CACHE_HIT] else
           "written" if CACHE_EVENTS[CACHE_WRITE] > before[CACHE_WRITE] else None)
  return step, state, batches, {"compile_s": compile_s, "lower_s": lower_s,
                                "compile_cache": cache, **program_memory(step),
                                "params": count_params(model)}


def run_steps(step, state, batches: list[dict], *, steps: int = 20, warmup: int = 2) -> dict:
  """Runs the compiled `step` `warmup` + `steps` times (state threaded through, as in
  training): median step_ms of the last `steps`, tokens_per_s, the first and last losses, and
  the allocator's memory (`allocator_memory`)."""
  times, losses = [], []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
    losses.append(metrics["loss"])
  step_s = statistics.median(times[warmup:])
  return {"step_ms": 1e3 * step_s, "min_ms": 1e3 * min(times[warmup:]),
          "tokens_per_s": batches[0]["inputs"].size / step_s, "n_steps": steps,
          "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
          **allocator_memory()}


def time_train_step(cfg: TrainConfig, batch_size: int, *, steps: int = 20, warmup: int = 2,
                    mesh=None, document: int | None = None) -> dict:
  """`compile_step`, then `run_steps`: both records in one. (In a process that ran other
  work before, measured_peak_gib is that process's peak so far.)"""
  step, state, batches, record = compile_step(cfg, batch_size, mesh=mesh, document=document)
  return record | run_steps(step, state, batches, steps=steps, warmup=warmup)


def check(row: dict) -> str | None:
  """Why a timed row is wrong, or None: both losses finite and near ln 256."""
  lo, hi = LOSS_RANGE
  for key in ("loss_first", "loss_last"):
    if not lo < row[key] < hi:
      return f"{key}={row[key]} is not in ({lo:.2f}, {hi:.2f}) (random bytes: ln 256)"
  return None


def memory_fields(option: str) -> dict:
  """A memory option's ModelConfig fields: "layer+scan" -> remat="layer", scan_layers=True."""
  remat, plus, scan = option.partition("+")
  if remat not in REMATS or (plus and scan != "scan"):
    raise ValueError(f"memory option {option!r} must be one of {', '.join(REMATS)}, optionally "
                     f"followed by '+scan' (e.g. 'layer+scan')")
  return {"remat": remat, "scan_layers": bool(plus)}


def case_config(preset: str, seq_len: int, attention: str, small: bool,
                memory_option: str, select_distill: float = 0.0,
                select_distill_stride: int = 1) -> TrainConfig:
  """The preset at `seq_len` with `attention` and `memory_option`, NSA with the selection
  distillation loss at weight `select_distill` (docs/selection_learning.md); --small: the
  reference ops (CPU)."""
  kw = dict(impl="xla") if small else {}
  if select_distill:
    kw |= {"select_distill": select_distill, "select_distill_stride": select_distill_stride}
  return make_config(preset, seq_len=seq_len, attention=attention, mixture="text",
                     progress=False, **memory_fields(memory_option), **kw)


# ----------------------------------------------------------------------------
# One attempt per process; the parent tries the memory options and collects the rows.


def failure(err: BaseException, text: str | None = None) -> dict:
  """A failed attempt's record: {"error": "out of memory", "oom_bytes" (what the failed
  allocation asked for), "message"} when `text` (default: the error's) says it ran out of
  memory, else {"error": its type and first line}."""
  text = str(err) if text is None else text
  if bc.is_oom(text):
    return {"error": OOM, "oom_bytes": bc.oom_bytes(text), "message": bc.describe_error(err)}
  return {"error": bc.describe_error(err)}


def attempt_here(spec: dict) -> dict:
  """One attempt in this process (a child): `spec` is a case (preset, seq_len, batch_size,
  attention, document), its memory_option, cache_dir, small, steps, and warm (compile only).
  Its record (`compile_step` and, unless warm, `run_steps`; on an error, `failure` with what
  was measured before it) and "device" (`bench_common.device_meta`)."""
  jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  record = {}
  try:
    cfg = case_config(spec["preset"], spec["seq_len"], ATTENTION_OF[spec["attention"]],
                      spec["small"], spec["memory_option"], spec.get("select_distill", 0.0),
                      spec.get("select_distill_stride", 1))
    step, state, batches, record = compile_step(cfg, spec["batch_size"],
                                                document=spec["document"])
    if not spec["warm"]:
      record |= run_steps(step, state, batches, steps=spec["steps"])
  except Exception as err:   # out of memory or a failed compile: recorded, the parent goes on
    record |= failure(err)
  return record | {"device": bc.device_meta()}


def attempt_in_child(spec: dict, timeout_s: float) -> dict:
  """`attempt_here(spec)` in a fresh Python process; a crash or a time-out as `failure`."""
  cmd = [sys.executable, "-m", "experiments.bench_train", "--child", json.dumps(spec)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=root)
  except subprocess.TimeoutExpired:
    return {"error": f"TimeoutError: the attempt took over {timeout_s:.0f} s"}
  found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
  if proc.returncode == 0 and found:
    return json.loads(found[-1])
  last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no output"]
  return failure(RuntimeError(f"the attempt's process exited {proc.returncode}: {last[0]}"),
                 proc.stderr)


def first_fit(case: dict, options: list[str], attempt, deadline: float) -> dict:
  """The row of `case`: `attempt(case, option)` for each memory option in order until one
  fits (no "error"). The row has the case, memory_option (the one that ran, None if none
  did), that attempt's record and not_fit, the records of the options tried before it (all of
  them when none fit; the row then has the last one's error). No attempt starts past
  `deadline` (time.perf_counter()): the row then says "skipped"."""
  row = dict(case, memory_option=None, not_fit=[])
  for option in options:
    if time.perf_counter() > deadline:
      return row | {"skipped": "time budget spent"}
    record = attempt(case, option)
    if "error" not in record:
      return row | record | {"memory_option": option}
    row["not_fit"].append({"memory_option": option, **record})
  return row | {k: v for k, v in row["not_fit"][-1].items() if k != "memory_option"}


def warm_record(record: dict) -> dict:
  """The warm start's fields of a row from the attempt that compiled its step again."""
  if "error" in record:
    return {"warm_error": record["error"]}
  return {"warm_compile_s": record["compile_s"], "warm_lower_s": record["lower_s"],
          "warm_cache": record["compile_cache"]}


def seq_lens(args, preset: str) -> list[int]:
  return args.seq_lens or list(SEQ_LENS.get(preset, DEFAULT_SEQ_LENS))


def run_cases(args, attempt) -> list[dict]:
  """Every (preset, T) case, NSA then full (with --packed, the same on packed rows next), each
  `first_fit` over args.memory, then (--warm) its step compiled again in a fresh process.
  `attempt(case, option, warm=False)` runs one attempt."""
  deadline = time.perf_counter() + args.budget_s
  rows = []
  for preset in args.presets:
    for T in seq_lens(args, preset):
      for document in (None, args.packed) if args.packed else (None,):
        for attention in ATTENTIONS + ((DISTILL,) if args.distill else ()):
          case = {"preset": preset, "seq_len": T, "batch_size": max(1, args.tokens // T),
                  "attention": attention, "document": document,
                  **({"select_distill": args.distill,
                      "select_distill_stride": args.distill_stride}
                     if attention == DISTILL else {})}
          row = first_fit(case, args.memory, attempt, deadline)
          if "tokens_per_s" in row:
            row["check"] = check(row) or "ok"
            if args.warm:
              row |= warm_record(attempt(case, row["memory_option"], warm=True))
          rows.append(row)
          print(summary(row), flush=True)
  return rows


def summary(row: dict) -> str:
  """One line of a row for the log."""
  tried = "".join(f"; {r['memory_option']}: {r['error']}"
                  + (f" ({r['oom_bytes'] / GIB:.1f} GiB asked)" if r.get("oom_bytes") else "")
                  for r in row["not_fit"])
  gib = lambda x: "-" if x is None else f"{x:.1f}"
  if "tokens_per_s" in row:
    what = (f"{row['memory_option']}: {row['tokens_per_s']:,.0f} tokens/s, "
            f"{row['step_ms']:.1f} ms/step, compile {row['compile_s']:.1f} s "
            f"({row['lower_s']:.1f} s tracing and lowering), "
            + (f"warm {row['warm_compile_s']:.1f} s ({row['warm_cache']}), "
               if "warm_compile_s" in row else "")
            + f"peak "
            f"{gib(row['measured_peak_gib'])} GiB measured / {gib(row['peak_gib'])} GiB XLA, "
            f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f} ({row['check']})")
  else:
    what = row.get("skipped") or "no option ran"
  data = f", packed {row['document']}" if row["document"] else ""
  return (f"[{row['preset']} T={row['seq_len']} B={row['batch_size']}{data}] "
          f"{row['attention']}: {what}{tried}")


def failures(rows: list[dict]) -> list[str]:
  """What went wrong, other than running out of memory: errors and bad losses."""
  out = []
  for r in rows:
    errors = [f"{t['memory_option']}: {t['error']}" for t in r["not_fit"] if t["error"] != OOM]
    errors += [f"loss: {r['check']}"] if r.get("check", "ok") != "ok" else []
    errors += [f"warm start: {r['warm_error']}"] if "warm_error" in r else []
    out += [f"{r['preset']} T={r['seq_len']} {r['attention']}: {e}" for e in errors]
  return out


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
    both = lambda key: [n.get(key), f.get(key)]
    out.append([preset, T, document or "-", n.get("batch_size"),
                f"{n.get('memory_option')} / {f.get('memory_option')}", *both("tokens_per_s"),
                ratio(n.get("tokens_per_s"), f.get("tokens_per_s")), *both("compile_s"),
                ratio(n.get("compile_s"), f.get("compile_s")), *both("warm_compile_s"),
                *both("measured_peak_gib"), *both("peak_gib")])
  return out


def plot(rows: list[dict], path: str) -> None:
  """Two panels per preset and data (random rows; packed rows: full attention then runs on the
  Pallas kernel, cuDNN takes no segment ids): tokens/s vs T, and peak memory vs T (the
  allocator's, XLA's estimate, and the allocator's pool)."""
  panels = {}
  for preset, document in dict.fromkeys((p, d) for p, _, d in cases(rows)):
    full = "full (Pallas, segment ids)" if document else "full (cuDNN)"

    def points(attention, key):
      return sorted((r["seq_len"], r[key]) for r in rows if r.get(key) is not None and
                    (r["preset"], r.get("document"), r["attention"]) == (preset, document,
                                                                         attention))
    speed = {label: points(attention, "tokens_per_s")
             for attention, label in (("full", full), ("nsa", "NSA"))}
    memory = {f"{label} ({what})": points(attention, key)
              for attention, label in (("full", "full"), ("nsa", "NSA"))
              for key, what in (("measured_peak_gib", "allocator"), ("peak_gib", "XLA"))}
    memory["pool"] = sorted(dict(points("nsa", "pool_gib") + points("full", "pool_gib")).items())
    data = f", documents of {document} tokens" if document else ""
    # Labels at full's points: NSA / full (tokens/s above 1: NSA trains faster; memory above
    # 1: NSA needs more).
    panels[f"{preset}{data}: training step, labels NSA / full"] = {
        "series": aligned(speed, full, "NSA"), "ratios": [(full, "NSA")], "ylabel": "tokens / s"}
    measured = "allocator" if memory["NSA (allocator)"] else "XLA"
    panels[f"{preset}{data}: peak memory, labels NSA / full ({measured})"] = {
        "series": aligned(memory, f"full ({measured})", f"NSA ({measured})"),
        "ratios": [(f"full ({measured})", f"NSA ({measured})")], "ylabel": "GiB"}
  if panels:
    bc.plot_loglog(path, panels)


def aligned(series: dict, den: str, num: str) -> dict:
  """{label: (xs, ys)} of {label: [(x, y)]}, without the empty ones; `den`'s points put at
  `num`'s xs (None where it has none), as plot_loglog's ratio labels pair points by index."""
  out = {label: tuple(zip(*pts)) for label, pts in series.items() if pts}
  if den in out and num in out:
    by_x = dict(zip(*out[den]))
    out[den] = (out[num][0], [by_x.get(x) for x in out[num][0]])
  return out


def card_memory_bytes() -> int | None:
  """The first GPU's total memory (nvidia-smi), or None where there is none."""
  try:
    text = subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                           "--format=csv,noheader,nounits"], capture_output=True, text=True,
                          timeout=60).stdout
    return int(text.split()[0]) * 2 ** 20
  except (OSError, subprocess.SubprocessError, ValueError, IndexError):
    return None


def appended(path: str, data: dict) -> dict:
  """`data` with the rows of an earlier run's JSON at `path` before its own (a row of the same
  case, memory options aside, replaced by the new one); the earlier run's meta is kept under
  earlier_runs. The two runs must share the GPU, tokens a step and steps."""
  with open(path) as f:
    old = json.load(f)
  for key, a, b in (("gpu", old["meta"]["gpu"], data["meta"]["gpu"]),
                    ("tokens_per_step", old["tokens_per_step"], data["tokens_per_step"]),
                    ("steps", old["steps"], data["steps"])):
    if a != b:
      raise SystemExit(f"--append {path}: its {key} is {a!r}, this run's {b!r}; rows of "
                       f"different runs are compared only when these are the same")
  key = lambda r: (r["preset"], r["seq_len"], r.get("document"), r["attention"])
  new = {key(r) for r in data["rows"]}
  return data | {"rows": [r for r in old["rows"] if key(r) not in new] + data["rows"],
                 "models": old["models"] | data["models"],
                 "earlier_runs": [old["meta"], *old.get("earlier_runs", [])]}


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

  cfgs = {a: case_config(preset, T, a, args.small, args.memory[0]) for a in ATTENTIONS}
  mc = cfgs["nsa"].model
  for attention, cfg in cfgs.items():
    step = time_train_step(cfg, batch, steps=args.steps)
    record("train step", attention, "fwd+bwd+update",
           {"median_ms": step["step_ms"], "compile_s": step["compile_s"],
            "peak_gib": step["peak_gib"]})
    one = dataclasses.replace(cfg.model, num_layers=1)
    layer = Transformer(one, rngs=nnx.Rngs(0)).layer(0).attn
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
  parser.add_argument("--seq-lens", default="",
                      help="T for every preset (default: research 8k..128k, others 8k..64k; "
                           "--breakdown: 8192)")
  parser.add_argument("--tokens", type=int, default=65536,
                      help="tokens per step: batch = tokens // T (at least 1)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per case (>= 20)")
  parser.add_argument("--memory", default=MEMORY_LADDER,
                      help="memory options tried in this order until one fits, the same for "
                           "NSA and full; one option: that one for every case. An option: "
                           f"remat ({', '.join(REMATS)}), '+scan' to scan the layers")
  parser.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                      help="compile each step again in a fresh process from the persistent "
                           "compilation cache (warm_compile_s)")
  parser.add_argument("--append", metavar="JSON",
                      help="an earlier run's bench_train_<gpu>.json: its rows are kept beside "
                           "this run's (a case run again replaced)")
  parser.add_argument("--packed", type=int, default=0, metavar="TOKENS",
                      help="also time every case on packed rows: documents of TOKENS tokens "
                           "(a multiple of select_block), segment ids through the model "
                           "(packed rows); full attention then runs on the Pallas kernel")
  parser.add_argument("--distill", type=float, default=0.0, metavar="WEIGHT",
                      help="also time NSA trained with the selection distillation loss at "
                           "this weight (rows 'nsa+distill'; issue #29's cost target)")
  parser.add_argument("--distill-stride", type=int, default=1, metavar="K",
                      help="--distill: the loss over every K-th chunk of queries "
                           "(ModelConfig.select_distill_stride)")
  parser.add_argument("--n-iter", type=int, default=10, help="--breakdown: runs per part")
  parser.add_argument("--top", type=int, default=25, help="--breakdown: device ops listed")
  parser.add_argument("--budget-s", type=float, default=480.0,
                      help="start no new attempt after this many seconds")
  parser.add_argument("--attempt-timeout-s", type=float, default=300.0,
                      help="an attempt's process running longer is stopped (an error)")
  parser.add_argument("--breakdown", action="store_true",
                      help="where one step's time goes: the step, one attention layer, the "
                           "op, its branches, the layer's other parts, the top device ops")
  parser.add_argument("--small", action="store_true",
                      help="CPU smoke test: defaults preset tiny, T = 160, 320 (--breakdown: "
                           "160), 320 tokens a step")
  parser.add_argument("--out", default=bc.default_out_dir())
  parser.add_argument("--child", metavar="JSON", help=argparse.SUPPRESS)   # attempt_here
  given = sys.argv[1:] if argv is None else argv
  if "--child" in given:
    args = parser.parse_args(argv)
    print("ROW " + json.dumps(attempt_here(json.loads(args.child))), flush=True)
    return
  if "--breakdown" in given:
    parser.set_defaults(presets="research", seq_lens="8192")
  if "--small" in given:
    parser.set_defaults(presets="tiny", tokens=320,
                        seq_lens="160" if "--breakdown" in given else "160,320")
  args = parser.parse_args(argv)
  args.presets = args.presets.split(",")
  args.seq_lens = [int(t) for t in args.seq_lens.split(",") if t]
  args.memory = args.memory.split(",")
  for option in args.memory:
    try:
      memory_fields(option)
    except ValueError as err:
      parser.error(f"--memory: {err}")
  if not args.distill >= 0:
    parser.error(f"--distill={args.distill} must be >= 0 (0: no distillation rows)")
  if args.distill_stride < 1:
    parser.error(f"--distill-stride={args.distill_stride} must be >= 1 (1: every query)")
  if args.steps < 20:
    parser.error(f"--steps={args.steps} must be >= 20 (docs/benchmarks.md#model-level)")
  for preset in args.presets if args.packed else ():
    block = make_config(preset).model.nsa.select_block
    if args.packed % block:
      parser.error(f"--packed={args.packed} must be a multiple of preset {preset}'s "
                   f"select_block={block} (documents start on selection blocks: "
                   f"docs/semantics.md#packed-rows)")
  if args.append and not os.path.exists(args.append):
    parser.error(f"--append {args.append}: no such file")
  start = time.perf_counter()

  if args.breakdown:
    print(f"device {bc.gpu_name()}, jax {jax.__version__}", flush=True)
    gpu = bc.slug(bc.gpu_name())
    for preset in args.presets:
      for T in args.seq_lens:
        result = breakdown(args, preset, T)
        bc.write_json(os.path.join(args.out, f"train_breakdown_{preset}_{T}_{gpu}.json"),
                      result)
        breakdown_table(result)
    print(f"wall {time.perf_counter() - start:.0f} s")
    return

  env = {name: os.environ.get(name) for name in MEMORY_ENV}
  for name, value in env.items():
    if value is not None:
      print(f"NOTE: {name}={value} is set: the allocator is not at JAX's defaults")
  device = {}
  cache_root = tempfile.mkdtemp(prefix="bench_train_cache_")
  caches = {}

  def attempt(case, option, warm=False):
    # A fresh directory per cold attempt: its compile_s is cold for XLA's GEMM autotuning
    # too (JAX keeps XLA's per-fusion autotuning results in the compilation cache's
    # directory; a shared one let later rows reuse earlier rows' results). The warm start
    # reads the directory of its case's cold attempt.
    key = json.dumps([case, option], sort_keys=True)
    if not warm:
      caches[key] = tempfile.mkdtemp(dir=cache_root)
    spec = dict(case, memory_option=option, warm=warm, cache_dir=caches[key], small=args.small,
                steps=args.steps)
    record = attempt_in_child(spec, args.attempt_timeout_s)
    device.update(record.pop("device", {}))
    return record

  try:
    rows = run_cases(args, attempt)
  finally:
    shutil.rmtree(cache_root, ignore_errors=True)
  if not device:
    sys.exit("no attempt ran (see above)")
  data = {"meta": bc.run_meta(device), "tokens_per_step": args.tokens, "steps": args.steps,
          "memory_options": args.memory, "card_memory_bytes": card_memory_bytes(),
          "memory_env": env,
          "packed": "rows with a document: packed rows of documents of that many tokens, "
                    "segment ids through the model; full attention on the Pallas kernel",
          "models": {p: dataclasses.asdict(make_config(p).model) for p in args.presets},
          "peak": "peak_gib: the compiled step's XLA buffer assignment (arguments, outputs, "
                  "temporaries); measured_peak_gib: the allocator's peak_bytes_in_use in the "
                  "row's own process (model, optimizer state, 3 batches, the step); pool_gib: "
                  "the allocator's limit",
          "wall_s": time.perf_counter() - start, "rows": rows}
  if args.append:
    data = appended(args.append, data)
  name = f"bench_train_{bc.slug(device['gpu'])}"
  bc.write_json(os.path.join(args.out, name + ".json"),
                {k: v for k, v in data.items() if k != "meta"}, device=device)
  plot(data["rows"], os.path.join(args.out, name + ".png"))
  print(f"\nNSA vs full attention, training step ({args.tokens} tokens a step) on "
        f"{device['gpu']}; wall {time.perf_counter() - start:.0f} s")
  bc.print_table(["preset", "T", "packed", "B", "memory nsa / full", "nsa tok/s", "full tok/s",
                  "nsa/full", "nsa compile s", "full compile s", "compile ratio",
                  "nsa warm s", "full warm s", "nsa GiB", "full GiB", "nsa GiB XLA",
                  "full GiB XLA"], ratio_rows(data["rows"]))
  print("\n" + "\n".join(report.train_targets(data)))
  failed = failures(rows)
  if failed:
    sys.exit(f"{len(failed)} failure(s): " + "; ".join(failed))


if __name__ == "__main__":
  main()
