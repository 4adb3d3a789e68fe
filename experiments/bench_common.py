"""Helpers shared by the experiment scripts: timing, matmul rate, kernel lookup, JSON, plots.

The timing method (docs/benchmarks.md#timing-method): jit, warm up, `block_until_ready`, median of
>= 10 runs over fresh random (never zero) inputs, rotated across runs so that
no run reads the same buffers as the one before it (that would time the L2).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:        # so that `python experiments/x.py` finds nsa_jax
  sys.path.insert(0, REPO_ROOT)

KERNEL_OPS = ("compressed_attention", "select_blocks", "selected_attention",
              "window_attention")


def small_config():
  """Block sizes scaled down for the tiny CPU shapes of the scripts' --small mode."""
  from nsa_jax import NSAConfig
  return NSAConfig(compress_block=16, compress_stride=8, select_block=32,
                   num_selected=4, window=32)


# Config A's group of 16 query heads per KV head, at tiny sizes (--small modes).
SMALL_SHAPE = dict(B=1, HKV=1, G=16, D=16)


@dataclasses.dataclass(frozen=True)
class Shape:
  """One benchmark or check shape: a label ("A", "G4", "T8191-G2", ...) and sizes."""
  config: str
  B: int
  T: int
  HQ: int
  HKV: int
  Dk: int
  Dv: int
  dtypes: tuple[str, ...] = ("bfloat16",)

  @property
  def G(self) -> int:
    return self.HQ // self.HKV


def random_nsa_inputs(B: int, T: int, HQ: int, HKV: int, Dk: int, Dv: int, config,
                      dtype, key) -> dict:
  """Random normal (never zero) inputs of `nsa`, gates through a sigmoid, plus
  "cotangent", a random cotangent of its [B, T, HQ, Dv] output."""
  Tc = config.num_compressed(T)
  ks = jax.random.split(key, 9)
  normal = lambda k, s: jax.random.normal(k, s, dtype)
  return {
      "q": normal(ks[0], (B, T, HQ, Dk)),
      "k_cmp": normal(ks[1], (B, Tc, HKV, Dk)), "v_cmp": normal(ks[2], (B, Tc, HKV, Dv)),
      "k_slc": normal(ks[3], (B, T, HKV, Dk)), "v_slc": normal(ks[4], (B, T, HKV, Dv)),
      "k_win": normal(ks[5], (B, T, HKV, Dk)), "v_win": normal(ks[6], (B, T, HKV, Dv)),
      "gates": jax.nn.sigmoid(jax.random.normal(ks[7], (B, T, HQ, 3), jnp.float32)).astype(dtype),
      "cotangent": normal(ks[8], (B, T, HQ, Dv)),
  }


def default_out_dir() -> str:
  """$OUT on the device machine, else experiments/results."""
  return os.environ.get("OUT") or os.path.join(REPO_ROOT, "experiments", "results")


def gpu_name() -> str:
  """Name of the first device, e.g. 'NVIDIA H100 80GB HBM3' (or 'cpu')."""
  return jax.devices()[0].device_kind


def slug(text: str) -> str:
  """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (for file names)."""
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def is_oom(err: BaseException) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def describe_error(err: BaseException) -> str:
  """One line naming the error: 'OOM: ...' for out-of-memory, else type and message."""
  first = (str(err).strip().splitlines() or [""])[0][:300]
  return ("OOM: " if is_oom(err) else f"{type(err).__name__}: ") + first


def kernel_impls(impl: str) -> dict[str, str]:
  """The impl each op will run: `impl`, except "xla" for a Pallas kernel module
  that is missing or fails to import (a note is printed). "nsa" gets "pallas"
  only when all four kernels import, since it calls all four with one impl."""
  used = {}
  for op in KERNEL_OPS:
    used[op] = impl
    if impl == "pallas":
      try:
        importlib.import_module(f"pallas_kernels.{op}")
      except Exception as err:   # a kernel still being written: time the reference instead
        print(f"NOTE: pallas_kernels.{op} unavailable ({describe_error(err)}); "
              f"using impl='xla' for {op}")
        used[op] = "xla"
  used["nsa"] = impl if all(used[op] == impl for op in KERNEL_OPS) else "xla"
  return used


def time_fn(fn: Callable, make_inputs: Callable, n_iter: int = 10, warmup: int = 2,
            n_inputs: int = 3, seed: int = 0) -> dict:
  """Median wall time of `jax.jit(fn)(*make_inputs(key))` in milliseconds.

  `make_inputs(key)` returns a tuple of arrays (random, never zero); `n_inputs`
  sets are drawn up front and rotated across the runs. The first call (trace +
  compile + run) is reported as `compile_s`; then `warmup` untimed runs, then
  `n_iter` timed runs, each ended by `block_until_ready`.
  """
  if n_iter < 10:
    raise ValueError(f"n_iter={n_iter} must be >= 10 (docs/benchmarks.md#timing-method)")
  jitted = jax.jit(fn)
  inputs = [jax.block_until_ready(make_inputs(jax.random.key(seed + i)))
            for i in range(n_inputs)]
  start = time.perf_counter()
  jax.block_until_ready(jitted(*inputs[0]))
  compile_s = time.perf_counter() - start
  for i in range(warmup):
    jax.block_until_ready(jitted(*inputs[(i + 1) % n_inputs]))
  times = []
  for i in range(n_iter):
    args = inputs[i % n_inputs]
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return {"median_ms": statistics.median(times), "min_ms": min(times),
          "max_ms": max(times), "n_iter": n_iter, "compile_s": compile_s}


def median_ms(f: Callable, *args, runs: int) -> float:
  """Median wall time in ms of `f(*args)` on fixed inputs, after a compiling
  call and one warm-up call (for the per-kernel check scripts)."""
  jax.block_until_ready(f(*args))   # compile
  jax.block_until_ready(f(*args))   # warm up
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def device_op_times(f: Callable, *args, runs: int = 5) -> list[tuple[str, float, int]]:
  """Where the device time of `f(*args)` goes: ("timeline: op", us per call, events per call).

  Runs `f` `runs` times under `jax.profiler.trace` and sums the durations of
  the events on the accelerator's timelines (process "/device:GPU:*" in the
  Perfetto trace) by name, largest first. Empty when no device timeline was
  recorded (CPU runs), so callers can print it unconditionally.
  """
  import collections
  import glob
  import gzip
  import json
  import tempfile

  jax.block_until_ready(f(*args))   # compile outside the trace
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(runs):
        jax.block_until_ready(f(*args))
    paths = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
      return []
    with gzip.open(paths[0]) as fh:
      trace = json.load(fh)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                 and e["args"]["name"].startswith("/device:")}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device_pids:
      # A device has several timelines (streams, "XLA Ops", "XLA Modules"): keep them apart.
      name = f"{threads.get((e['pid'], e.get('tid')), '?')}: {e['name']}"
      total[name] += e.get("dur", 0.0)
      count[name] += 1
  return [(name, us / runs, count[name] // runs) for name, us in total.most_common()]


def try_time_fn(fn: Callable, make_inputs: Callable, **kw) -> dict:
  """`time_fn`, but an error (out of memory, a kernel that fails to compile)
  is returned as {"error": ...} so that one bad point does not end a run."""
  try:
    return time_fn(fn, make_inputs, **kw)
  except Exception as err:   # recorded in the results, never silently dropped
    return {"error": describe_error(err)}


def forward_backward(f: Callable, num_diff: int) -> Callable:
  """fn(*args, cotangent) -> (f(*args), grads w.r.t. the first `num_diff` args).

  The backward pass is driven by a random cotangent (via `jax.vjp`), the
  output is returned too so that nothing of the forward is dead code.
  """
  def fn(*args):
    *args, cotangent = args
    diff, rest = args[:num_diff], args[num_diff:]
    out, vjp = jax.vjp(lambda *d: f(*d, *rest), *diff)
    return out, vjp(cotangent)
  return fn


def matmul_rate(n: int = 8192, dtype=jnp.bfloat16, n_iter: int = 10) -> float:
  """Measured bf16 matmul rate in TFLOP/s: an n x n x n product on random data."""
  def make(key):
    ka, kb = jax.random.split(key)
    return (jax.random.normal(ka, (n, n), dtype), jax.random.normal(kb, (n, n), dtype))
  ms = time_fn(jnp.matmul, make, n_iter=n_iter)["median_ms"]
  return 2 * n ** 3 / (ms * 1e-3) / 1e12


def write_json(path: str, data: dict, config=None, extra_meta: dict | None = None) -> None:
  """Writes `data` with the GPU name, jax version, backend, `config` and
  `extra_meta` added under "meta"."""
  meta = run_meta()
  if config is not None:
    meta["config"] = (dataclasses.asdict(config) if dataclasses.is_dataclass(config)
                      else config)
  meta.update(extra_meta or {})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"meta": meta, **data}, f, indent=1, default=str)
  print(f"wrote {path}")


def run_meta() -> dict:
  """What identifies a run: GPU name, backend, jax version, command line, UTC time."""
  return {"gpu": gpu_name(), "backend": jax.default_backend(),
          "jax_version": jax.__version__, "argv": sys.argv,
          "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def print_table(header: Sequence[str], rows: Sequence[Sequence]) -> None:
  """Fixed-width table; floats with 3 significant digits, None as '-'."""
  def cell(x):
    if x is None:
      return "-"
    if isinstance(x, float):
      return f"{x:.3g}"
    return str(x)
  text = [[cell(x) for x in row] for row in [header, *rows]]
  widths = [max(len(r[i]) for r in text) for i in range(len(header))]
  for r in text:
    print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def save_figure(fig, path) -> None:
  """Lays out, writes (120 dpi) and closes a matplotlib figure; says where."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}")


def plot_loglog(path: str, panels: dict, xlabel: str = "T (tokens)",
                ylabel: str = "time (ms)") -> None:
  """Log-log plot, one panel per entry of `panels`.

  panels: {title: {"series": {label: (xs, ys)}, "ratios": [(num, den), ...]}}.
  Each (num, den) pair labels every x of series `num` with `den / num` as
  "2.5x" (the speedup of `num` over `den`). Points with y None are left out.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
  for ax, (title, panel) in zip(axes[0], panels.items()):
    series = panel["series"]
    for label, (xs, ys) in series.items():
      pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=label)
    for num, den in panel.get("ratios", []):
      if num not in series or den not in series:
        continue
      for x, y, y_den in zip(*series[num], series[den][1]):
        if y and y_den:
          ax.annotate(f"{y_den / y:.2g}x", (x, y), textcoords="offset points",
                      xytext=(0, -12), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  save_figure(fig, path)
