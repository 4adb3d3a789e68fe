"""GPU check and benchmark of the jax-triton top-n selection kernel against the Pallas one.

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=.:/tmp/site python3 experiments/check_triton_select.py     # on a GPU

Issue #3: does `experiments/select_blocks_triton.py` (Triton language,
in-register `tl.topk`, launched by `jax_triton.triton_call`) beat
`pallas_kernels/select_blocks.py` (running top-n by passes of max)? Both get
the compressed branch's lse, as inside `nsa`.

1. Agreement, per (query, KV group) row, of the Triton kernel with the Pallas
   kernel (and with `select_blocks_xla` for T <= XLA_UP_TO): Config A of SPEC
   §5 at T = 8192 in bf16 and float32, and odd shapes (T = 8191, G = 1, G = 2,
   Dk = 192, T < l', T < l), lse from the XLA reference. Same criterion as
   check_select.py: sets may differ only at near-ties (at most
   MAX_DIFFERING_ROWS of the rows, reference-score gap <= MAX_GAP[dtype]).
2. Timing (bench_common.median_ms: compile, warm-up, median of RUNS runs) of
   both kernels on the same fresh random inputs, lse given (computed once by
   the compressed-attention kernel, untimed), Config A bf16, T = 8k .. 64k;
   Triton tile variants at the largest T; G = 1 and G = 4 at T = 16k.

Measured (H200, T = 64k): Triton 23.6 ms (18.5 ms at 4 warps) vs Pallas 12.8 ms,
so the Triton kernel stays an experiment here, not a code path of `nsa_jax`
(experiments/results/check_triton_select_h200.json, PERF_NOTES.md).

Prints a table last; writes $OUT/check_triton_select.json (experiments/results
without $OUT) after each stage. Errors of the Triton path (jax_triton missing,
compile or launch failure) are recorded there, not raised. Exit status 1 when a
check fails or the Triton path errs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback

import jax
import jax.numpy as jnp

import bench_common
import check_select
from nsa_jax import NSAConfig, compressed_attention
from nsa_jax.ops.selection import select_blocks_xla
from pallas_kernels import select_blocks as pallas_select
import select_blocks_triton as triton_select

RUNS = 10
XLA_UP_TO = 8192
CONFIG_A = dict(B=1, HQ=64, HKV=4, Dk=128)
# (name, T, shape, dtype): Config A, then odd shapes.
CHECKS = [
    ("A", 8192, CONFIG_A, jnp.bfloat16),
    ("A", 8192, CONFIG_A, jnp.float32),
    ("A", 8191, CONFIG_A, jnp.bfloat16),
    ("G=1", 4099, dict(B=1, HQ=4, HKV=4, Dk=128), jnp.bfloat16),
    ("G=1", 4099, dict(B=1, HQ=4, HKV=4, Dk=128), jnp.float32),
    ("G=2", 3001, dict(B=2, HQ=8, HKV=4, Dk=128), jnp.bfloat16),
    ("G=2", 3001, dict(B=2, HQ=8, HKV=4, Dk=128), jnp.float32),
    ("Dk=192", 4096, dict(B=1, HQ=64, HKV=4, Dk=192), jnp.bfloat16),
    ("T<l'", 50, CONFIG_A, jnp.float32),
    ("T<l", 20, CONFIG_A, jnp.bfloat16),
]
# Smaller GQA groups, timed at one T: the tile holds more tokens (Bq = 256 / G),
# so the sort's share of the work grows as G shrinks.
SMALL_G = {"G=1": dict(B=1, HQ=4, HKV=4, Dk=128), "G=4": dict(B=1, HQ=16, HKV=4, Dk=128)}
SMALL_G_T = 16384
VARIANTS = {"default": triton_select.DEFAULT_TILES,
            **{name: dataclasses.replace(triton_select.DEFAULT_TILES, **change) for name, change in
               {"w4": dict(num_warps=4), "bk128": dict(block_k=128),
                "stages3": dict(num_stages=3)}.items()}}


def inputs_with_lse(key, T, shape, dtype, config, impl):
  """q, k_cmp and the compressed branch's lse (`compressed_attention` with `impl`)."""
  q, k_cmp = check_select.make_inputs(key, T=T, config=config, dtype=dtype, **shape)
  v_cmp = jax.random.normal(jax.random.fold_in(key, 1), k_cmp.shape, dtype)
  _, lse = jax.jit(lambda q, k, v: compressed_attention(
      q, k, v, config=config, impl=impl))(q, k_cmp, v_cmp)
  return q, k_cmp, lse


def run_triton(fn):
  """fn() or {"error": ...} with the error's first line (the traceback is printed)."""
  try:
    return fn()
  except Exception as err:   # recorded in the JSON: jax_triton missing, compile/launch errors
    traceback.print_exc()
    return {"error": bench_common.describe_error(err)}


def check(name, T, shape, dtype, config, key):
  scale = shape["Dk"] ** -0.5
  q, k_cmp, lse = inputs_with_lse(key, T, shape, dtype, config, "xla")
  row = {"name": name, "T": T, **shape, "dtype": jnp.dtype(dtype).name}
  got = run_triton(lambda: jax.jit(lambda q, k, lse: triton_select.select_blocks(
      q, k, config=config, scale=scale, lse=lse))(q, k_cmp, lse))
  if isinstance(got, dict):
    return {**row, **got, "ok": False}
  refs = {"pallas": jax.jit(lambda q, k, lse: pallas_select.select_blocks(
      q, k, config=config, scale=scale, interpret=False, lse=lse))(q, k_cmp, lse)}
  if T <= XLA_UP_TO:
    refs["xla"] = jax.jit(lambda q, k, lse: select_blocks_xla(
        q, k, config=config, scale=scale, lse=lse))(q, k_cmp, lse)
  row["ok"] = True
  for ref_name, want in refs.items():
    d = check_select.disagreement(got, want, q, k_cmp, config, scale)
    d["ok"] = (d["frac_rows"] <= check_select.MAX_DIFFERING_ROWS
               and d["max_gap"] <= check_select.MAX_GAP[row["dtype"]])
    row["vs_" + ref_name] = d
    row["ok"] = row["ok"] and d["ok"]
  return row


def bench(T, shape_name, shape, config, variants, key):
  scale = shape["Dk"] ** -0.5
  q, k_cmp, lse = inputs_with_lse(key, T, shape, jnp.bfloat16, config, "pallas")
  row = {"T": T, "shape": shape_name, **shape, "ms": {}}
  pallas = jax.jit(lambda q, k, lse: pallas_select.select_blocks(
      q, k, config=config, scale=scale, interpret=False, lse=lse))
  row["ms"]["pallas"] = bench_common.median_ms(pallas, q, k_cmp, lse, runs=RUNS)
  for name, tiles in variants.items():
    fn = jax.jit(lambda q, k, lse, tiles=tiles: triton_select.select_blocks(
        q, k, config=config, scale=scale, lse=lse, tiles=tiles))
    ms = run_triton(lambda: bench_common.median_ms(fn, q, k_cmp, lse, runs=RUNS))
    if isinstance(ms, dict):
      row.setdefault("errors", {})["triton-" + name] = ms["error"]
      ms = None
    row["ms"]["triton-" + name] = ms
  print(f"  {shape_name} T={T}: " + ", ".join(f"{k} {v if v is None else round(v, 3)}"
                                  for k, v in row["ms"].items()), flush=True)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--max-t", type=int, default=65536)
  args = parser.parse_args()
  config = NSAConfig()
  out_path = os.path.join(bench_common.default_out_dir(), "check_triton_select.json")
  result = {"shape": CONFIG_A, "runs": RUNS,
            "tiles": {k: dataclasses.asdict(t) for k, t in VARIANTS.items()},
            "checks": [], "bench": []}
  print(f"device: {bench_common.gpu_name()}, jax {jax.__version__}", flush=True)
  try:
    import jax_triton
    import triton
    result["versions"] = {"jax_triton": jax_triton.__version__,
                          "triton": triton.__version__}
  except Exception as err:   # the Triton path is optional: record why it is missing
    result["import_error"] = bench_common.describe_error(err)
    print("jax_triton unavailable:", result["import_error"], flush=True)

  key = jax.random.key(0)
  for i, (name, T, shape, dtype) in enumerate(CHECKS):
    r = check(name, T, shape, dtype, config, jax.random.fold_in(key, i))
    result["checks"].append(r)
    print(f"  check {name} T={T} {r['dtype']}: ok={r['ok']}"
          + (f" {r['error']}" if "error" in r else ""), flush=True)
    bench_common.write_json(out_path, result, config)

  bench_ts = [T for T in (8192, 16384, 32768, 65536) if T <= args.max_t]
  default = {"default": VARIANTS["default"]}
  points = ([(T, "A", CONFIG_A, VARIANTS if T == bench_ts[-1] else default)
             for T in bench_ts]
            + [(SMALL_G_T, name, shape, default) for name, shape in SMALL_G.items()])
  for i, (T, shape_name, shape, variants) in enumerate(points):
    if "import_error" in result:
      variants = {}
    result["bench"].append(bench(T, shape_name, shape, config, variants,
                                 jax.random.fold_in(key, 100 + i)))
    bench_common.write_json(out_path, result, config)

  result["all_ok"] = all(c["ok"] for c in result["checks"]) and not any(
      "errors" in b for b in result["bench"])
  bench_common.write_json(out_path, result, config)

  print("\nagreement of the Triton kernel (rows = (query, KV group) pairs)")
  bench_common.print_table(
      ["case", "T", "dtype", "vs", "differing rows", "frac rows", "max gap", "ok"],
      [[c["name"], c["T"], c["dtype"], ref[3:], c[ref]["differing_rows"],
        c[ref]["frac_rows"], c[ref]["max_gap"], c[ref]["ok"]]
       for c in result["checks"] for ref in ("vs_pallas", "vs_xla") if ref in c]
      + [[c["name"], c["T"], c["dtype"], "-", "-", "-", "-", c["error"]]
         for c in result["checks"] if "error" in c])
  print("\ntiming, bf16, lse given (ms, median of "
        f"{RUNS}; speedup = pallas / triton-default; A = Config A, G=16)")
  names = list(dict.fromkeys(k for b in result["bench"] for k in b["ms"]))
  bench_common.print_table(
      ["shape", "T", *names, "speedup"],
      [[b["shape"], b["T"], *[b["ms"].get(n) for n in names],
        (b["ms"]["pallas"] / b["ms"]["triton-default"]
         if b["ms"].get("triton-default") else None)]
       for b in result["bench"]])
  print("all checks OK" if result["all_ok"] else "SOME CHECKS FAILED (see JSON)")
  sys.exit(0 if result["all_ok"] else 1)


if __name__ == "__main__":
  main()
