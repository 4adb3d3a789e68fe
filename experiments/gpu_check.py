"""GPU correctness check: the NSA ops against the float32 reference (docs/api.md#ops), on a
list of shapes or on the shape matrix of issue #18 (`--matrix`).

This file is the command line and the records' bookkeeping (the summary, --rerun's merge,
the table printed last); the cases are in gpu_check_cases.py, their computation in
gpu_check_units.py, their running in gpu_check_runner.py. What is checked, how, and --rerun:
docs/benchmarks.md#gpu-checks. Exits non-zero on any failure or error outside the probes.

    python -m experiments.gpu_check                # SHAPES: a few minutes on an H200
    python -m experiments.gpu_check --matrix       # issue #18 (--budget-s 360)
    python -m experiments.gpu_check --matrix --rerun gpu_matrix_nvidia-h200.json
    python -m experiments.gpu_check --packed       # issue #20, packed rows (--budget-s 360)
    python -m experiments.gpu_check --offsets      # issue #23, query offsets (one GPU)
    python -m experiments.gpu_check --small [--matrix | --packed | --offsets]   # tiny, CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax

from experiments import bench_common as bc
from experiments.gpu_check_cases import (OPS, SHAPES, SMALL_SHAPES, Case, cases_of,
                                         matrix_cases, offsets_cases, packed_cases)
from experiments.gpu_check_runner import check_offsets, run_everywhere
from experiments.gpu_check_units import RTOL, SELECTION_TOL, TIE_RTOL, UNIT_OF
from experiments.report import check_groups
from nsa_jax import NSAConfig
from nsa_jax.ops import cudnn


def summarize(records) -> dict:
  counted = [r for r in records if not r["probe"]]
  return {status: sum(r["status"] == status for r in counted)
          for status in ("pass", "fail", "error", "skipped")}


# ----------------------------------------------------------------------------
# --rerun: what an earlier run left to do, and one JSON of both runs
# ----------------------------------------------------------------------------
def record_key(r: dict) -> tuple:
  return r["case"], r["dtype"], r["op"], r["impl"]


def left_to_do(cases, previous: dict, redo) -> list[Case]:
  """`cases` with only the ops `previous` (a JSON this script wrote) has no pass
  for (skipped, error, fail, or no record), and every op of the cases named in
  `redo`. Probes keep their outcome: theirs informs, a rerun would not judge it."""
  done = {record_key(r): r for r in previous["records"]}

  def todo(case, op, impl):
    r = done.get((case.name, case.dtype, op, impl))
    return case.name in redo or r is None or (r["status"] != "pass" and not r["probe"])

  left = [dataclasses.replace(c, ops=tuple(o for o in c.ops if todo(c, *o))) for c in cases]
  return [c for c in left if c.ops]


def runs_of(data: dict) -> list[dict]:
  """The runs whose records a JSON of this script holds (meta["runs"]; the run
  itself for a JSON written before --rerun existed)."""
  if "runs" in data["meta"]:
    return data["meta"]["runs"]
  return [dict(data["meta"], wall_s=data.get("wall_s"), cudnn_limits=data.get("cudnn_limits"),
               summary=data["summary"])]


def merge(previous: dict, records: list[dict], cases: list[dict]) -> tuple[list, list]:
  """(records, cases) of `previous` with this run's records in place of the ones
  they redo; cases: this run's case list, then previous cases no longer in it."""
  redone = {record_key(r) for r in records}
  kept = [dict(r, run=r.get("run", 0)) for r in previous["records"]
          if record_key(r) not in redone]
  names = {(c["config"], c["dtype"]) for c in cases}
  return kept + records, cases + [c for c in previous["cases"]
                                  if (c["config"], c["dtype"]) not in names]


def in_order(records: list[dict], cases: list[dict]) -> list[dict]:
  """`records` in the order of `cases` (a JSON's case list), a case's ops as in OPS (then
  --offsets' ops)."""
  order = {(c["config"], c["dtype"]): i for i, c in enumerate(cases)}
  ops = OPS + ("sparse_branches", "sparse_branches_selection")
  return sorted(records, key=lambda r: (order[(r["case"], r["dtype"])], ops.index(r["op"]),
                                        r["impl"]))


def print_summary(records) -> None:
  """Per (op, impl, dtype): passes and the worst error over its tolerance; then
  every record that did not pass, and the probes."""
  rows = []
  for op, impl, dtype, rs, worst in check_groups(records):
    rows.append([op, impl, dtype, f"{sum(r['status'] == 'pass' for r in rs)}/{len(rs)}",
                 worst and worst["case"], worst and worst["worst"],
                 worst and worst["rel_err"], rs[0]["tol"]])
  print()
  bc.print_table(["op", "impl", "dtype", "passed", "worst case", "quantity", "rel err", "tol"], rows)
  others = [r for r in records if r["status"] != "pass" or r["probe"]]
  if others:
    print()
    bc.print_table(["case", "dtype", "op", "impl", "status", "quantity", "rel err", "tol",
                    "probe / message"],
                   [[r["case"], r["dtype"], r["op"], r["impl"], r["status"], r["worst"],
                     r["rel_err"], r["tol"], (r["probe"] or r["message"])[:90]] for r in others])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--matrix", action="store_true",
                      help="issue #18's shape matrix (gpu_matrix_<gpu>.json)")
  parser.add_argument("--packed", action="store_true",
                      help="issue #20: packed rows against their documents alone "
                           "(gpu_packed_<gpu>.json)")
  parser.add_argument("--offsets", action="store_true",
                      help="issue #23: the sparse branches of query slices at query offsets "
                           "(a context shard's work) against the whole call at offset 0 "
                           "(gpu_offsets_<gpu>.json)")
  parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
  parser.add_argument("--impl", default="pallas", choices=("pallas", "xla"),
                      help="the side under test without --matrix (xla: checks this script "
                           "against itself)")
  parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
  parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  parser.add_argument("--rerun", default=None, metavar="PATH",
                      help="a JSON this script wrote: run only what it has no pass for and "
                           "write one JSON of both runs (module doc)")
  parser.add_argument("--redo", default="", metavar="CASES",
                      help="with --rerun: comma-separated cases to run again though they passed")
  parser.add_argument("--budget-s", type=float, default=None,
                      help="no case starts after this many seconds: the rest are skipped "
                           "(default 220, with --matrix or --packed 360)")
  cpus = os.cpu_count() or 1
  parser.add_argument("--procs", type=int, default=None,
                      help="processes sharing the GPU (tracing holds the GIL: one process "
                           f"lowers one unit at a time); default {max(1, cpus // 2)} with "
                           "--matrix, else 1")
  parser.add_argument("--workers", type=int, default=len(set(UNIT_OF.values())),
                      help="compile threads per process (default: the units of a case)")
  parser.add_argument("--out", default=bc.default_out_dir())
  args = parser.parse_args(argv)
  ops = [op for op in args.ops.split(",") if op]
  unknown = set(ops) - set(OPS)
  if unknown:
    parser.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
  if args.redo and not args.rerun:
    parser.error("--redo needs --rerun")
  budget_s = args.budget_s if args.budget_s is not None else (
      360.0 if args.matrix or args.packed else 220.0)
  procs = args.procs or (max(1, cpus // 2) if args.matrix else 1)
  if procs > 1:   # the processes share the GPU: each allocates what it uses
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  # A check needs correct GEMMs, not the fastest: no autotuning, and cuBLAS
  # rather than Triton GEMM fusions to compile (see "Speed" in gpu_check_runner.py).
  for flag in ("--xla_gpu_autotune_level=0", "--xla_gpu_enable_triton_gemm=false"):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + flag
  start, deadline = time.perf_counter(), time.time() + budget_s

  config = bc.small_config() if args.small else NSAConfig()
  if args.matrix:
    cases = [dataclasses.replace(c, ops=tuple(o for o in c.ops if o[0] in ops))
             for c in matrix_cases(args.small)]
  elif args.packed:
    cases = packed_cases(args.small, tuple((op, args.impl) for op in ops))
  elif args.offsets:
    cases = offsets_cases(args.small)
  else:
    cases = cases_of(SMALL_SHAPES if args.small else SHAPES, tuple((op, args.impl) for op in ops))
  cases = [c for c in cases if c.ops and (not args.cases or c.name in args.cases.split(","))]
  case_list = [dict(dataclasses.asdict(c.shape), dtype=c.dtype, kind=c.kind, rows=c.rows,
                    limits=dict(c.limits), probe=c.probe or None, runs=c.runs) for c in cases]
  previous = None
  if args.rerun:
    with open(args.rerun) as f:
      previous = json.load(f)
    cases = left_to_do(cases, previous, set(args.redo.split(",")) - {""})
  print(f"device {bc.gpu_name()}, jax {jax.__version__}, {len(cases)} cases "
        f"({sum(len(c.ops) for c in cases)} records), budget {budget_s:.0f} s, {procs} processes "
        f"x {args.workers} compile threads", flush=True)

  records = (check_offsets(cases, config, deadline) if args.offsets else
             run_everywhere(cases, args.small, config, deadline, procs, args.workers))
  summary = summarize(records)
  wall_s = time.perf_counter() - start
  this_run = dict(bc.run_meta(), wall_s=wall_s, cudnn_limits={"MAX_ELEMENTS": cudnn.MAX_ELEMENTS},
                  summary=summary)
  runs = runs_of(previous) if previous else []
  records = [dict(r, run=len(runs)) for r in records]
  if previous:
    records, case_list = merge(previous, records, case_list)
  records = in_order(records, case_list)

  merged = summarize(records)
  name = ("gpu_matrix" if args.matrix else "gpu_packed" if args.packed else
          "gpu_offsets" if args.offsets else "gpu_check")
  bc.write_json(os.path.join(args.out, f"{name}_{bc.slug(bc.gpu_name())}.json"), {
      "summary": merged, "wall_s": wall_s,
      "tolerances": {"rtol": RTOL, "select_blocks_tie_rtol": TIE_RTOL,
                     "nsa_vs_select_blocks_share": SELECTION_TOL,
                     "why": "module doc of experiments/gpu_check_units.py"},
      "cudnn_limits": this_run["cudnn_limits"], "cases": case_list, "records": records},
      config=config, extra_meta={"runs": runs + [this_run]})
  print_summary(records)
  print(f"\nthis run: {summary['pass']} passed, {summary['fail']} failed, {summary['error']} "
        f"errors, {summary['skipped']} skipped (probes apart); wall {wall_s:.0f} s")
  if previous:
    print(f"with {args.rerun}: {merged['pass']} passed, {merged['fail']} failed, "
          f"{merged['error']} errors, {merged['skipped']} skipped")
  return 1 if merged["fail"] or merged["error"] else 0


if __name__ == "__main__":
  sys.exit(main())
