"""GPU check and benchmark of the top-n block selection Pallas kernel.

    PYTHONPATH=. python experiments/check_select.py           # on a GPU
    PYTHONPATH=. python experiments/check_select.py --sweep   # + tile variants at the largest T
    PYTHONPATH=. python experiments/check_select.py --small   # CPU, interpret mode
    --with-lse: time the kernel as `nsa` runs it, given the compressed branch's lse

1. Agreement with `select_blocks_xla` at Config A of SPEC §5 (B=1, HQ=64,
   HKV=4, Dk=128, paper block sizes), bf16 and float32, T = 8k and 16k: the
   fraction of (query, KV group) rows whose selected sets differ, and, for
   those, the relative gap between the reference scores of the blocks only
   one side chose (scores recomputed at "highest" matmul precision). The two
   sum in different orders, so sets may differ only at near-ties: at most
   MAX_DIFFERING_ROWS of the rows, each with a gap <= MAX_GAP[dtype]. float32
   gets a looser gap: both sides run its QK matmul in TF32 (JAX's default on
   GPU), rounding q and k to 10 bits of mantissa differently.
2. Timing of the kernel at Config A, bf16, T = 8k .. 64k (and the XLA
   reference up to 16k): jit, warm-up, median of >= 10 runs over fresh random
   inputs (bench_common.time_fn). `qk TFLOP/s` counts the QK matmuls over the
   visible compressed keys, twice (the lse pass and the scoring pass).

Prints tables; writes JSON to $OUT/check_select.json when $OUT is set; exits
with status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import bench_common
import nsa_jax
from nsa_jax import NSAConfig
from nsa_jax.ops import _common
from nsa_jax.ops.selection import overlap_to_select_blocks, select_blocks_xla
from pallas_kernels.select_blocks import WITH_LSE, Tiles, select_blocks

MAX_DIFFERING_ROWS = 0.01
MAX_GAP = {"bfloat16": 1e-4, "float32": 1e-2}
ANALYZED_ROWS = 512        # differing rows whose score gaps are recomputed


def make_inputs(key, B, T, HQ, HKV, Dk, config, dtype):
  kq, kk = jax.random.split(key)
  q = jax.random.normal(kq, (B, T, HQ, Dk), dtype)
  k_cmp = jax.random.normal(kk, (B, config.num_compressed(T), HKV, Dk), dtype)
  return q, k_cmp


def ranked_row_scores(q, k_cmp, rows, config, scale):
  """Reference block scores of rows (b, t, g) [R, 3], ranked: forced +inf,
  non-candidates -inf. float32 math at "highest" precision. Returns [R, Ts]."""
  b, t, g = (jnp.asarray(rows[:, i]) for i in range(3))
  HKV, Tc = k_cmp.shape[2], k_cmp.shape[1]
  G = q.shape[2] // HKV
  Ts = config.num_select_blocks(q.shape[1])
  qr = q.reshape(*q.shape[:2], HKV, G, -1)[b, t, g].astype(jnp.float32)   # [R, G, Dk]
  kr = jnp.moveaxis(k_cmp, 2, 1)[b, g].astype(jnp.float32)                # [R, Tc, Dk]
  with jax.default_matmul_precision("highest"):
    s = jnp.einsum("rgd,rkd->rgk", qr, kr) * scale
  visible = (jnp.arange(Tc) * config.compress_stride + config.compress_block - 1
             <= t[:, None])
  p, _ = _common.masked_softmax(s, visible[:, None, :])
  scores = overlap_to_select_blocks(p.sum(axis=1), config, Ts)
  j = jnp.arange(Ts)[None, :]
  current = (t // config.select_block)[:, None]
  candidate = j <= current
  forced = candidate & ((j < config.num_initial) | (j > current - config.num_local))
  return np.asarray(jnp.where(forced, jnp.inf,
                              jnp.where(candidate, scores, -jnp.inf)))


def disagreement(got, want, q, k_cmp, config, scale):
  """Fraction of rows whose sets differ, and the reference-score gaps there."""
  got, want = np.sort(np.asarray(got), -1), np.sort(np.asarray(want), -1)
  differ = np.argwhere((got != want).any(-1))                # [R, 3] (b, t, g)
  chosen = np.sum(want >= 0)
  missed_total, gaps = 0, []
  analyzed = differ[:ANALYZED_ROWS]
  for start in range(0, len(analyzed), 64):
    rows = analyzed[start:start + 64]
    ranked = ranked_row_scores(q, k_cmp, rows, config, scale)
    for (b, t, g), row in zip(rows, ranked):
      mine, ref = set(got[b, t, g]) - {-1}, set(want[b, t, g]) - {-1}
      missed, extra = sorted(ref - mine), sorted(mine - ref)
      missed_total += len(missed)
      if not missed or len(mine) != len(ref):
        gaps.append(np.inf)
        continue
      hi, lo = row[missed].max(), row[extra].min()
      gaps.append(float((hi - lo) / abs(hi)) if np.isfinite([hi, lo]).all() else np.inf)
  rows_total = got.shape[0] * got.shape[1] * got.shape[2]
  return {"rows": rows_total, "differing_rows": int(len(differ)),
          "frac_rows": len(differ) / rows_total,
          "frac_slots_analyzed": float(missed_total / chosen),
          "analyzed_rows": int(len(analyzed)),
          "max_gap": max(gaps, default=0.0),
          "median_gap": float(np.median(gaps)) if gaps else 0.0}


def check(T, dtype, config, shape, interpret, key):
  scale = shape["Dk"] ** -0.5
  q, k_cmp = make_inputs(key, T=T, config=config, dtype=dtype, **shape)
  got = jax.jit(lambda q, k: select_blocks(
      q, k, config=config, scale=scale, interpret=interpret))(q, k_cmp)
  want = jax.jit(lambda q, k: select_blocks_xla(
      q, k, config=config, scale=scale))(q, k_cmp)
  r = {"T": T, "dtype": jnp.dtype(dtype).name,
       **disagreement(got, want, q, k_cmp, config, scale)}
  r["ok"] = (r["frac_rows"] <= MAX_DIFFERING_ROWS
             and r["max_gap"] <= MAX_GAP[r["dtype"]])
  return r


def visible_keys(T, config):
  """Sum over queries t of the compressed blocks visible to t."""
  t = np.arange(T)
  return float(np.clip((t - config.compress_block + 1) // config.compress_stride + 1,
                       0, config.num_compressed(T)).sum())


def bench(T, config, shape, interpret, variants, runs, xla_up_to, with_lse=False):
  scale = shape["Dk"] ** -0.5
  make = lambda key: make_inputs(key, T=T, config=config, dtype=jnp.bfloat16, **shape)
  if with_lse:   # as inside `nsa`: the compressed branch's lse is given, pass 1 skipped
    lse_of = jax.jit(lambda q, k: nsa_jax.compressed_attention(
        q, k, k, config=config, scale=scale, impl="xla")[1])
    def make(key, make_qk=make):
      q, k = make_qk(key)
      return q, k, lse_of(q, k)
  qk_flop = (1 if with_lse else 2) * 2 * shape["B"] * shape["HQ"] * shape["Dk"] * visible_keys(
      T, config)
  row = {"T": T, "with_lse": with_lse, "qk_tflop": qk_flop / 1e12, "ms": {}, "qk_tflops": {}}
  for name, tiles in variants.items():
    fn = lambda q, k, lse=None, tiles=tiles: select_blocks(
        q, k, config=config, scale=scale, interpret=interpret, tiles=tiles, lse=lse)
    res = bench_common.try_time_fn(fn, make, n_iter=runs)
    row["ms"][name] = res.get("median_ms")
    row["qk_tflops"][name] = (qk_flop / (res["median_ms"] * 1e-3) / 1e12
                              if "median_ms" in res else None)
    if "error" in res:
      row.setdefault("errors", {})[name] = res["error"]
  if T <= xla_up_to:
    res = bench_common.try_time_fn(
        lambda q, k, lse=None: select_blocks_xla(q, k, config=config, scale=scale), make,
        n_iter=runs)
    row["ms"]["xla-ref"] = res.get("median_ms")
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="tiny shapes in interpret mode (CPU smoke test)")
  parser.add_argument("--sweep", action="store_true",
                      help="also time tile variants at the largest T")
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--max-t", type=int, default=65536)
  parser.add_argument("--with-lse", action="store_true",
                      help="time the kernel given the compressed branch's lse (as in nsa)")
  args = parser.parse_args()

  if args.small:
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=16,
                       num_selected=4, window=16)
    shape = dict(B=1, HQ=16, HKV=2, Dk=32)
    check_ts, bench_ts, interpret, xla_up_to = [130, 300], [256, 512], True, 512
  else:
    config = NSAConfig()
    shape = dict(B=1, HQ=64, HKV=4, Dk=128)        # Config A
    check_ts, interpret, xla_up_to = [8192, 16384], False, 16384
    bench_ts = [T for T in (8192, 16384, 32768, 65536) if T <= args.max_t]
  variants = {"default": WITH_LSE if args.with_lse else Tiles()}   # select_blocks' defaults
  extras = {"bq32": Tiles(block_q=32), "bq128": Tiles(block_q=128),
            "bk32": Tiles(block_k=32), "bk128": Tiles(block_k=128),
            "w2": Tiles(num_warps=2), "w8": Tiles(num_warps=8),
            "stages1": Tiles(num_stages=1), "stages3": Tiles(num_stages=3)}
  result = {"shape": shape, "tiles": {k: dataclasses.asdict(t)
                                      for k, t in {**variants, **extras}.items()},
            "checks": [], "bench": []}
  key = jax.random.key(0)
  print(f"device: {bench_common.gpu_name()}, jax {jax.__version__}", flush=True)

  print("\nagreement with select_blocks_xla (rows = (query, KV group) pairs)")
  for T in check_ts:
    for dtype in (jnp.bfloat16, jnp.float32):
      result["checks"].append(check(T, dtype, config, shape, interpret, key))
  bench_common.print_table(
      ["T", "dtype", "differing rows", "frac rows", "frac slots", "max gap",
       "median gap", "ok"],
      [[c["T"], c["dtype"], c["differing_rows"], c["frac_rows"],
        c["frac_slots_analyzed"], c["max_gap"], c["median_gap"], c["ok"]]
       for c in result["checks"]])

  print("\ntiming, bf16 (ms; qk TFLOP/s in brackets)")
  for T in bench_ts:
    timed = {**variants, **extras} if args.sweep and T == bench_ts[-1] else variants
    r = bench(T, config, shape, interpret, timed, args.runs, xla_up_to, args.with_lse)
    result["bench"].append(r)
    for name, ms in r["ms"].items():
      tf = r["qk_tflops"].get(name)
      print(f"  T={T:6d} {name:10s} {ms if ms is None else round(ms, 3)!s:>10} ms"
            + (f"  [{tf:.3g}]" if tf else "") + (
                f"  {r['errors'][name]}" if name in r.get("errors", {}) else ""),
            flush=True)

  result["all_ok"] = all(c["ok"] for c in result["checks"])
  if os.environ.get("OUT"):
    bench_common.write_json(os.path.join(os.environ["OUT"], "check_select.json"),
                            result, config)
  print("all checks OK" if result["all_ok"] else "SOME CHECKS FAILED")
  sys.exit(0 if result["all_ok"] else 1)


if __name__ == "__main__":
  main()
