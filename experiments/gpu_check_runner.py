"""Runs the cases of experiments/gpu_check.py (gpu_check_cases.py) by their units
(gpu_check_units.py) under a time budget, and makes their records.

Units are lowered in order while a thread pool compiles them; with --procs > 1 the cases
run in three phases of processes (large cases, "reference" cases on shared workers, probes;
`run_everywhere`). A unit that fails is retried op by op; no case starts after --budget-s.
Why and how: docs/benchmarks.md#running-the-cases.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import time
import zlib

import jax
import jax.numpy as jnp

from experiments import bench_common as bc
from experiments.gpu_check_cases import Case
from experiments.gpu_check_units import (case_inputs, cudnn_limits, offsets_function,
                                         reference_precision, tolerance, unit_function, units)
from nsa_jax import NSAConfig


class Runner:
  """Runs cases in this process: lowers their units in order (tracing holds the
  GIL), compiles them in a thread pool (XLA's compile releases it) and runs them
  in order. No case starts after `deadline` (a time.time() value)."""

  def __init__(self, config: NSAConfig, deadline: float, workers: int):
    self.config = config
    self.deadline = deadline
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)

  def submit(self, unit: Case, shapes):
    """Lowers `unit` for inputs of `shapes` here and compiles it in the pool: a
    future of (compiled function, {"lower": s, "compile": s}), or of the error."""
    start = time.perf_counter()
    try:
      with cudnn_limits(unit.limits):
        lowered = jax.jit(unit_function(unit, self.config)).lower(shapes)
    except Exception as err:   # a lowering error is the unit's result
      failed = concurrent.futures.Future()
      failed.set_exception(err)
      return failed
    seconds = {"lower": time.perf_counter() - start}

    def compile_():
      start = time.perf_counter()
      compiled = lowered.compile()
      return compiled, dict(seconds, compile=time.perf_counter() - start)
    return self.pool.submit(compile_)

  def start(self, case: Case):
    """Lowers the case's units and submits their compiles: what `finish` takes."""
    make = jax.jit(case_inputs(case, self.config))
    # The same inputs in any process; "rbg": one XLA op, not threefry's hundreds.
    key = jax.random.key(zlib.crc32(f"{case.name}|{case.dtype}".encode()), impl="rbg")
    shapes = jax.eval_shape(make, key)
    return make, key, [(unit, self.submit(unit, shapes)) for unit in units(case)]

  def finish(self, case: Case, started) -> list[dict]:
    """Makes the case's inputs and runs its compiled units: its records."""
    make, key, jobs = started
    try:
      x = make(key)
    except Exception as err:   # out of memory, say: no op can run
      return [record(case, op, impl, "error", message=bc.describe_error(err))
              for op, impl in case.ops]
    return [r for unit, future in jobs for r in self.finish_unit(unit, future, x)]

  def finish_unit(self, unit: Case, future, x) -> list[dict]:
    """Runs a compiled unit: its records. A unit that fails to lower, compile or
    run is retried op by op while the budget lasts, so that the error lands on
    the op that caused it; past the budget its ops get its error."""
    try:
      compiled, seconds = future.result()
      start = time.perf_counter()
      metrics = jax.device_get(compiled(x))
      seconds["run"] = time.perf_counter() - start
    except Exception as err:
      message = bc.describe_error(err)
      if len(unit.ops) > 1 and time.time() <= self.deadline:
        singles = [dataclasses.replace(unit, ops=(op,)) for op in unit.ops]
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x)
        futures = [self.submit(single, shapes) for single in singles]
        return [r for single, fut in zip(singles, futures)
                for r in self.finish_unit(single, fut, x)]
      note = "" if len(unit.ops) == 1 else " (error of its unit; budget spent, not retried alone)"
      return [record(unit, op, impl, "error", message=message + note) for op, impl in unit.ops]
    return [record(unit, op, impl, metrics=metrics[f"{op}|{impl}"], seconds=seconds)
            for op, impl in unit.ops]

  def run(self, cases, label: str = "") -> list[dict]:
    """Lowers every case in order (compiles proceed meanwhile), then runs them in order."""
    jobs = [(case, None if time.time() > self.deadline else self.start(case)) for case in cases]
    records = []
    for case, started in jobs:
      start = time.perf_counter()
      done = skipped(case) if started is None else self.finish(case, started)
      records += done
      statuses = " ".join(f"{r['op']}[{r['impl']}]={r['status']}" for r in done)
      print(f"{label}{case.name} {case.dtype} ({case.kind}, {time.perf_counter() - start:.1f} s "
            f"after lowering): {statuses}", flush=True)
    self.pool.shutdown(wait=False, cancel_futures=True)
    return records


def run_cases(cases, small: bool, deadline: float, workers: int, label: str) -> list[dict]:
  """`Runner.run` in a worker process."""
  config = bc.small_config() if small else NSAConfig()
  return Runner(config, deadline, workers).run(cases, label)


def skipped(case: Case) -> list[dict]:
  return [record(case, op, impl, "skipped", message="time budget spent") for op, impl in case.ops]


def record(case: Case, op: str, impl: str, status: str | None = None, *,
           metrics: dict | None = None, seconds: dict | None = None, message: str = "") -> dict:
  """One record per (case, op, impl): its errors by quantity and its status;
  `seconds`: lowering, compiling and running the unit that checked it."""
  s, tol = case.shape, tolerance(op, case.dtype)
  out = {"case": case.name, "kind": case.kind, "op": op, "impl": impl,
         "shape": [s.B, s.T, s.HQ, s.HKV, s.Dk, s.Dv], "dtype": case.dtype,
         "tol": tol, "probe": case.probe or None,
         "seconds": seconds and {k: round(v, 2) for k, v in seconds.items()}}
  if metrics is None:
    return dict(out, status=status, message=message, errors={}, worst=None,
                rel_err=None, max_rel=None)
  errors = {q: {k: (bool(v) if k == "ok" else float(v)) for k, v in m.items()}
            for q, m in metrics.items()}
  worst = max(errors, key=lambda q: errors[q]["rel"])
  ok = all(m["ok"] and m["rel"] <= tol for m in errors.values())
  notes = [f"{q}: non-finite pattern or NaN" for q, m in errors.items() if not m["ok"]]
  return dict(out, status="pass" if ok else "fail", message="; ".join(notes), errors=errors,
              worst=worst, rel_err=errors[worst]["rel"], max_rel=errors[worst]["max_rel"])


def check_offsets(cases, config: NSAConfig, deadline: float) -> list[dict]:
  """Records of the --offsets cases, one at a time (few and small)."""
  records = []
  for case in cases:
    if time.time() > deadline:
      records += skipped(case)
      continue
    start = time.perf_counter()
    try:
      s = case.shape
      if s.T % case.rows:
        raise ValueError(f"{case.name}: T={s.T} is not a multiple of the slice {case.rows}")
      x = jax.jit(case_inputs(case, config))(jax.random.key(zlib.crc32(case.name.encode())))
      offsets = jnp.arange(0, s.T, case.rows, dtype=jnp.int32)
      with reference_precision(case.dtype):
        metrics = jax.device_get(jax.jit(offsets_function(case, config))(x, offsets))
      records += [record(case, *key.split("|"), metrics=m, seconds={
          "total": time.perf_counter() - start}) for key, m in metrics.items()]
    except Exception as err:   # recorded, the run goes on
      records += [record(case, op, impl, "error", message=bc.describe_error(err))
                  for op, impl in case.ops]
    print(f"{case.name} {case.dtype} (offsets, {time.perf_counter() - start:.1f} s): "
          f"{records[-1]['status']} {records[-1]['message']}", flush=True)
  return records


def run_everywhere(cases, small: bool, config, deadline: float, procs: int,
                   workers: int) -> list[dict]:
  """Records of every case. One process (procs = 1) runs them all. Else in three phases,
  each in processes of its own that exit after it, so that a phase's GPU memory (XLA's
  allocator keeps what it grew to) is free for the next: the large cases in one
  process; then the "reference" cases (small, many), one at a time to the first free
  of `procs` worker processes sharing the GPU; then the probes (the unsplit call might
  take its process down: then only the probes are lost)."""
  if procs == 1:
    return Runner(config, deadline, workers).run(cases)
  probes = [c for c in cases if c.probe]
  shared = [c for c in cases if c.kind == "reference" and not c.probe]
  large = [c for c in cases if c not in shared and c not in probes]
  spawn = multiprocessing.get_context("spawn")   # a forked jax process is unsafe
  records = []
  for group, n, label in ((large, 1, "large"), (shared, procs, "shared"),
                          (probes, 1, "probe")):
    jobs = [[c] for c in group] if label == "shared" else [group] if group else []
    with concurrent.futures.ProcessPoolExecutor(n, mp_context=spawn) as pool:
      futures = [(job, pool.submit(run_cases, job, small, deadline, workers,
                                   f"[{label} {i + 1}/{len(jobs)}] "))
                 for i, job in enumerate(jobs)]
      for job, future in futures:
        try:
          records += future.result()
        except Exception as err:   # a worker process died: its cases are errors
          records += [record(c, op, impl, "error", message=bc.describe_error(err))
                      for c in job for op, impl in c.ops]
  return records
