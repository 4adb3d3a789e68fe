"""GPU correctness check: every NSA op with impl="pallas" against impl="xla" (SPEC §4).

For each case (shape) and dtype it compares, on fresh random inputs:
  - compressed_attention: o and lse (the -inf pattern exactly), and the
    gradients of q, k_cmp, v_cmp under random cotangents of o and lse;
  - select_blocks: the Pallas selection must be a valid top-n of the
    reference's block scores (SPEC §3 "Selection"): right count, forced blocks
    in, non-candidates out, no duplicates, and no unselected candidate scoring
    more than a selected one beyond a near-tie tolerance (two correct
    implementations may break near-ties differently); the reference's own
    selection is held to the same test;
  - selected_attention (on the reference's block_idx) and window_attention:
    o and the gradients of q, k, v;
  - nsa: o and the gradients of all eight float inputs, against the gated sum
    of the reference branches run on the selection nsa made (with the
    compressed branch's lse), so that near-tie selection differences (checked
    above) do not count as errors. On a GPU, nsa's window branch is cuDNN's
    for the 16-bit inputs cuDNN takes (`nsa_jax.ops._common.cudnn_runs`).
Error: ||a - b|| / ||b|| over finite reference entries, plus a NaN / inf check;
max |a - b| / max |b| is reported beside it ("max rel"), not judged: a 2-stage
backward miscompile that raised one gradient's max error 5x moved its norm
error only from ~2.5e-3 to 4e-3 (PERF_NOTES).
Thresholds: float32 1e-3 (Triton runs float32 dots in TF32, ~3e-4 relative
error, while the reference runs at "highest" precision); bfloat16 2e-2 (the
kernels round P, dS and outputs to bf16, eps 3.9e-3; the reference runs in
float32 on the same bf16 inputs). Exits non-zero on any failure.

Run on the device machine (about 3-4 minutes on an H100):
    python3 experiments/gpu_check.py
    python3 experiments/gpu_check.py --small    # tiny shapes, CPU (interpret mode)
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")   # reference backward is big

import argparse
import contextlib
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp

import bench_common as bc   # also puts the repo root on sys.path
from nsa_jax import (NSAConfig, compressed_attention, nsa, select_blocks,
                     selected_attention, window_attention)
from nsa_jax.ops import _common
from nsa_jax.ops.compressed import compressed_scores
from nsa_jax.ops.selection import overlap_to_select_blocks

RTOL = {"float32": 1e-3, "bfloat16": 2e-2}
# Near-tie tolerance of the selection, relative to the row's largest
# non-forced candidate score: scores are sums of softmax probabilities that
# the two implementations compute in different orders (float32 inputs: TF32).
TIE_RTOL = 5e-3
OPS = ("compressed_attention", "select_blocks", "selected_attention",
       "window_attention", "nsa")
NSA_ARGS = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")


Case = bc.Shape   # config: the case's name; dtypes: those it is checked in


# Priority order: a spent time budget skips the last ones. Small odd shapes
# first (they compile and run fast), then Config A. The references run in
# float32 on upcast inputs, with chunked, rematerialised backward passes.
CASES = (
    Case("T20-noblock", 1, 20, 16, 1, 128, 128, ("float32",)),   # T < l: Tc = 0
    Case("T300-B2-G3", 2, 300, 6, 2, 64, 64, ("float32",)),   # G not a power of 2, T < w
    Case("T8191-G1", 1, 8191, 8, 8, 128, 128, ("float32",)),
    Case("T8191-G2", 1, 8191, 8, 4, 128, 128, ("bfloat16",)),
    Case("A-8k", 1, 8192, 64, 4, 128, 128, ("bfloat16", "float32")),
    Case("T8191-G16-Dk192", 1, 8191, 32, 2, 192, 128, ("bfloat16", "float32")),
    Case("A-16k", 1, 16384, 64, 4, 128, 128, ("bfloat16",)),
)
SMALL_CASES = (
    Case("small-G2", 1, 100, 4, 2, 32, 32, ("float32",)),
    Case("small-B2-G3-Dk48", 2, 45, 3, 1, 48, 32, ("bfloat16",)),
)


def reference_precision(dtype: str):
  """float32 references at full precision (XLA's GPU default for float32 is TF32)."""
  return jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()


@jax.jit
def compare(a, b):
  """(||a - b|| / ||b|| over entries where b is finite; max |a - b| / max |b|,
  reported only: it shows localised errors the norm averages away; whether a
  is NaN-free and non-finite exactly where b is, with the same value there)."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  finite = jnp.isfinite(b)
  diff = jnp.where(finite, a - b, 0.0)
  ref = jnp.where(finite, b, 0.0)
  err = jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)
  max_rel = (jnp.max(jnp.abs(diff), initial=0.0)        # initial: empty arrays (T < l: Tc = 0)
             / jnp.maximum(jnp.max(jnp.abs(ref), initial=0.0), 1e-30))
  same_pattern = jnp.all(jnp.isfinite(a) == finite) & jnp.all(jnp.where(finite, True, a == b))
  return err, max_rel, same_pattern & ~jnp.any(jnp.isnan(a))


def reference_scores(q, k_cmp, *, config: NSAConfig):
  """Block scores score[b, t, g, j] of SPEC §3 "Importance scores", [B, T, HKV, Ts] float32."""
  B, T, HQ, _ = q.shape
  HKV, Ts = k_cmp.shape[2], config.num_select_blocks(T)
  scale = _common.resolve_scale(None, q)
  if k_cmp.shape[1] == 0:
    return jnp.zeros((B, T, HKV, Ts), jnp.float32)

  def chunk_fn(start, qc):
    s, mask = compressed_scores(qc, start, k_cmp, config, scale)
    p, _ = _common.masked_softmax(s, mask)                 # [B, HKV, G, C, Tc]
    scores = overlap_to_select_blocks(p.sum(axis=2), config, Ts)
    return jnp.moveaxis(scores, 1, 2).astype(jnp.float32)   # [B, C, HKV, Ts]

  return _common.map_query_chunks(chunk_fn, (q,), 256)


def selection_check(block_idx, scores, *, config: NSAConfig):
  """(rows breaking a hard rule, worst near-tie gap) of a selection [B, T, HKV, n].

  Hard rules (SPEC §3): entries in [-1, Ts), no duplicates, min(n, #candidates)
  blocks, all of them candidates (j*l' <= t), the forced blocks among them.
  The gap of a row is (best unselected candidate - worst selected non-forced
  block) / largest non-forced candidate score, clipped at 0: 0 for an exact
  top-n, small for a near-tie swap.
  """
  B, T, HKV, n = block_idx.shape
  Ts = scores.shape[-1]
  t = jnp.arange(T)[None, :, None, None]
  j = jnp.arange(Ts)[None, None, None, :]
  cur = t // config.select_block
  cand = j <= cur                                                      # [1, T, 1, Ts]
  forced = cand & ((j < config.num_initial) | (j > cur - config.num_local))
  count = jnp.sum(block_idx[..., None] == j[..., None, :], axis=-2)    # [B, T, HKV, Ts]
  sel = count > 0
  want = jnp.minimum(n, cur[..., 0] + 1)
  bad = (jnp.any((block_idx < -1) | (block_idx >= Ts), axis=-1)
         | jnp.any(count > 1, axis=-1)
         | (jnp.sum(sel, axis=-1) != want)
         | (jnp.sum(block_idx == -1, axis=-1) != n - want)
         | jnp.any(sel & ~cand, axis=-1)
         | jnp.any(forced & ~sel, axis=-1))
  free = cand & ~forced
  worst_in = jnp.min(jnp.where(sel & free, scores, jnp.inf), axis=-1)
  best_out = jnp.max(jnp.where(free & ~sel, scores, -jnp.inf), axis=-1)
  top = jnp.max(jnp.where(free, jnp.abs(scores), 0.0), axis=-1)
  gap = jnp.where(jnp.isfinite(worst_in) & jnp.isfinite(best_out),
                  jnp.maximum(best_out - worst_in, 0.0) / jnp.maximum(top, 1e-30), 0.0)
  return jnp.sum(bad), jnp.max(gap)


def rows_differing(a, b):
  """Rows (query, KV head) whose selected sets differ, order ignored."""
  return jnp.sum(jnp.any(jnp.sort(a, axis=-1) != jnp.sort(b, axis=-1), axis=-1))


def gated_reference(config: NSAConfig):
  """nsa's formula (paper Eq. 5) over the reference branches, with a given selection."""
  kw = dict(config=config, impl="xla")

  def f(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, block_idx):
    g = gates[..., None]
    return (g[..., 0, :] * compressed_attention(q, k_cmp, v_cmp, **kw)[0]
            + g[..., 1, :] * selected_attention(q, k_slc, v_slc, block_idx, **kw)
            + g[..., 2, :] * window_attention(q, k_win, v_win, **kw))
  return f


class Checker:
  def __init__(self, args, config, impls):
    self.args, self.config, self.impls = args, config, impls
    self.rows = []

  def add(self, case, dtype, op, quantity, err, tol, ok, note="", max_rel=None):
    status = "PASS" if ok and err <= tol else "FAIL"
    self.rows.append({"case": case.config, "dtype": dtype, "op": op, "quantity": quantity,
                      "err": float(err), "tol": tol, "finite_ok": bool(ok),
                      "status": status, "note": note, "max_rel": max_rel})

  def add_error(self, case, dtype, op, status, message):
    self.rows.append({"case": case.config, "dtype": dtype, "op": op, "quantity": "-",
                      "err": None, "tol": None, "finite_ok": False, "status": status,
                      "note": message})

  def compare_trees(self, case, dtype, op, names, got, ref):
    for name, a, b in zip(names, jax.tree.leaves(got), jax.tree.leaves(ref)):
      err, max_rel, ok = compare(a, b)
      self.add(case, dtype, op, name, float(err), RTOL[dtype], bool(ok),
               max_rel=float(max_rel))

  def vjp_pair(self, case, dtype, op, names, f_pallas, f_ref, args, num_diff):
    """Compares (f(*args), grads of the first num_diff args) of the two impls."""
    fb_p = jax.jit(bc.forward_backward(f_pallas, num_diff))
    fb_x = jax.jit(bc.forward_backward(f_ref, num_diff))
    got = fb_p(*args)
    # The reference runs in float32 on upcast inputs, at full precision: a bf16
    # XLA reference accumulates dK/dV of gathered blocks in bf16 scatter-adds
    # and is itself ~4% off (seen on an H200 for selected attention).
    upcast = lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a
    with reference_precision("float32"):
      ref = fb_x(*jax.tree.map(upcast, args))
    self.compare_trees(case, dtype, op, names, got, ref)

  def run_case(self, case: Case, dtype: str, key):
    cfg, impls = self.config, self.impls
    x = bc.random_nsa_inputs(case.B, case.T, case.HQ, case.HKV, case.Dk, case.Dv, cfg,
                             jnp.dtype(dtype), key)
    k_ct = jax.random.split(jax.random.fold_in(key, 1), 2)
    d_lse = jax.random.normal(k_ct[0], (case.B, case.T, case.HQ), jnp.float32)
    q, kc, vc = x["q"], x["k_cmp"], x["v_cmp"]

    def op_impl(fn, impl):
      return lambda *a: fn(*a, config=cfg, impl=impl)

    steps = {
        "compressed_attention": lambda: self.vjp_pair(
            case, dtype, "compressed_attention", ["o", "lse", "dq", "dk_cmp", "dv_cmp"],
            op_impl(compressed_attention, impls["compressed_attention"]),
            op_impl(compressed_attention, "xla"),
            (q, kc, vc, (x["cotangent"], d_lse)), 3),
        "select_blocks": lambda: self.check_selection(case, dtype, q, kc),
        "selected_attention": lambda: self.vjp_pair(
            case, dtype, "selected_attention", ["o", "dq", "dk", "dv"],
            op_impl(selected_attention, impls["selected_attention"]),
            op_impl(selected_attention, "xla"),
            (q, x["k_slc"], x["v_slc"], self.selection(q, kc, "xla"),
             x["cotangent"]), 3),
        "window_attention": lambda: self.vjp_pair(
            case, dtype, "window_attention", ["o", "dq", "dk", "dv"],
            op_impl(window_attention, impls["window_attention"]),
            op_impl(window_attention, "xla"),
            (q, x["k_win"], x["v_win"], x["cotangent"]), 3),
        "nsa": lambda: self.vjp_pair(
            case, dtype, "nsa", ["o"] + ["d" + n for n in NSA_ARGS],
            lambda *a: nsa(*a[:-1], config=cfg, impl=impls["nsa"]),   # selects itself
            gated_reference(cfg),
            tuple(x[n] for n in NSA_ARGS) + (self.nsa_selection(x), x["cotangent"]),
            len(NSA_ARGS)),
    }
    for op in self.args.ops:
      if time.perf_counter() > self.deadline:
        self.add_error(case, dtype, op, "SKIP", "time budget spent")
        continue
      if impls[op] != "pallas" and not self.args.small:
        self.add_error(case, dtype, op, "FAIL", "no Pallas kernel to check (see NOTE above)")
        continue
      start = time.perf_counter()
      try:
        steps[op]()
      except Exception as err:   # a crash is a failure of that op, the others still run
        self.add_error(case, dtype, op, "ERROR", bc.describe_error(err))
      print(f"  {case.config} {dtype} {op}: {time.perf_counter() - start:.1f} s", flush=True)

  def selection(self, q, k_cmp, impl):
    """block_idx of `impl`; the float32 reference at full precision."""
    precision = reference_precision(str(q.dtype)) if impl == "xla" else contextlib.nullcontext()
    with precision:
      return jax.jit(lambda q, k: select_blocks(q, k, config=self.config, impl=impl))(q, k_cmp)

  def nsa_selection(self, x):
    """The block_idx `nsa` selects for itself: with the compressed branch's lse,
    which may break near-ties unlike `select_blocks` computing its own."""
    f = lambda *a: nsa(*a, config=self.config, impl=self.impls["nsa"],
                       return_block_idx=True)[1]
    return jax.jit(f)(*(x[n] for n in NSA_ARGS))

  def check_selection(self, case, dtype, q, k_cmp):
    got = self.selection(q, k_cmp, self.impls["select_blocks"])
    ref = self.selection(q, k_cmp, "xla")
    with reference_precision(dtype):
      scores = jax.jit(lambda q, k: reference_scores(q, k, config=self.config))(q, k_cmp)
    differ = int(rows_differing(got, ref))
    for quantity, idx in [("block_idx", got), ("block_idx[xla]", ref)]:
      bad, gap = jax.jit(lambda i, s: selection_check(i, s, config=self.config))(idx, scores)
      note = f"{int(bad)} rows break a rule" if int(bad) else ""
      if quantity == "block_idx":
        note += f"{'; ' if note else ''}{differ} of {got[..., 0].size} rows differ from xla"
      self.add(case, dtype, "select_blocks", quantity, float(gap), TIE_RTOL, int(bad) == 0, note)

  def run(self, cases):
    self.deadline = time.perf_counter() + self.args.budget_s
    for i, case in enumerate(cases):
      for dtype in case.dtypes:
        self.run_case(case, dtype, jax.random.key(i))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
  parser.add_argument("--impl", default="pallas", choices=("pallas", "xla"),
                      help="the side under test (xla: checks this script against itself)")
  parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
  parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  parser.add_argument("--budget-s", type=float, default=220.0,
                      help="skip (and report) checks not started after this many seconds")
  parser.add_argument("--out", default=bc.default_out_dir())
  args = parser.parse_args(argv)
  args.ops = [op for op in args.ops.split(",") if op]
  unknown = set(args.ops) - set(OPS)
  if unknown:
    parser.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
  start = time.perf_counter()

  config = bc.small_config() if args.small else NSAConfig()
  cases = SMALL_CASES if args.small else CASES
  if args.cases:
    cases = [c for c in cases if c.config in args.cases.split(",")]
  impls = bc.kernel_impls(args.impl)
  print(f"device {bc.gpu_name()}, jax {jax.__version__}, impls {impls}", flush=True)

  checker = Checker(args, config, impls)
  checker.run(cases)
  rows = checker.rows
  failed = [r for r in rows if r["status"] not in ("PASS", "SKIP")]
  skipped = [r for r in rows if r["status"] == "SKIP"]
  bc.write_json(os.path.join(args.out, f"gpu_check_{bc.slug(bc.gpu_name())}.json"), {
      "impls": impls, "rtol": RTOL, "tie_rtol": TIE_RTOL,
      "cases": [dataclasses.asdict(c) for c in cases], "rows": rows,
      "failed": len(failed), "wall_s": time.perf_counter() - start}, config=config)

  # One line per (case, dtype, op): its worst quantity relative to its tolerance.
  worst = {}
  for r in rows:
    k = (r["case"], r["dtype"], r["op"])
    score = float("inf") if r["err"] is None else r["err"] / r["tol"]
    if r["status"] != "PASS":
      score = float("inf")
    if k not in worst or score > worst[k][0]:
      worst[k] = (score, r)
  print()
  bc.print_table(["case", "dtype", "op", "worst", "rel err", "tol", "status", "max rel", "note"],
                 [[r["case"], r["dtype"], r["op"], r["quantity"], r["err"], r["tol"],
                   r["status"], r.get("max_rel"), r["note"]] for _, r in worst.values()])
  for r in failed:
    print(f"FAIL {r['case']} {r['dtype']} {r['op']} {r['quantity']}: err={r['err']} "
          f"tol={r['tol']} finite_ok={r['finite_ok']} {r['note']}")
  print(f"\n{len(rows) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
        f"{len(skipped)} skipped; wall {time.perf_counter() - start:.0f} s")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
