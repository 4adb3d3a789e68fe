"""Per-step decode attention latency: NSA vs dense attention on the same cache sizes.

For each context T and batch B, one new token per sequence attends to a full cache of T
tokens (Config A's heads): `nsa_jax.ops.decode.nsa_decode` (impl "pallas" and "xla") against
dense attention over the same cache (cuDNN and XLA), `STEPS` dependent steps in one
`lax.fori_loop`; on a GPU the Pallas step is first checked against the XLA one (`CHECKS`).
Method, byte time and launch floor: docs/benchmarks.md#decoding. --breakdown splits the NSA
step's device time by kernel. Writes decode_bench.json and decode_bench.png to --out
(default $OUT, else experiments/results; a temporary folder with --small).

GPU:  PYTHONPATH=. python experiments/bench_decode.py
CPU smoke test (interpret mode, tiny shapes):
      PYTHONPATH=. python experiments/bench_decode.py --small
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile

import jax
import jax.numpy as jnp

from experiments.bench_common import default_out_dir, device_op_times, median_ms
from nsa_jax import NSAConfig
from nsa_jax import decoding
from nsa_jax.ops import decode

STEPS = 16


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--contexts", default="8192,16384,32768,65536,131072")
  ap.add_argument("--batches", default="1,8,32")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--methods", default="nsa_pallas,nsa_xla,dense_cudnn,dense_xla",
                  help="subset of nsa_pallas, nsa_xla, dense_cudnn, dense_xla")
  ap.add_argument("--out", default=None,
                  help="default: $OUT, else experiments/results (a temporary folder with --small)")
  ap.add_argument("--unroll", action="store_true",
                  help="unroll the STEPS-step loop (no per-step loop overhead)")
  ap.add_argument("--breakdown", type=int, default=65536,
                  help="context at which the NSA step's device time is split by kernel "
                       "(profiler trace; 0 = none)")
  ap.add_argument("--small", action="store_true",
                  help="CPU smoke test: tiny shapes, interpret mode")
  return ap.parse_args()


def timed(fn, *args, reps: int) -> float:
  """Median seconds per step of fn (which runs STEPS steps)."""
  return median_ms(fn, *args, runs=reps) / 1e3 / STEPS


def steps_loop(attend, unroll: bool = False):
  """STEPS decode steps; each query depends on the previous output. Unrolled,
  the GPU runs them back to back without the while loop's per-iteration check."""
  def run(q, *rest):
    def body(_, q):
      o = attend(q, *rest)
      return q + (1e-3 * o.mean(axis=-1, keepdims=True)).astype(q.dtype)
    return jax.lax.fori_loop(0, STEPS, body, q, unroll=unroll)
  return jax.jit(run)


def launch_floor(reps: int, kernels=(0, 1, 3, 5), interpret: bool = False) -> dict[str, float]:
  """Seconds per step of the timing loop itself, without attention: each step
  runs k trivial dependent Pallas kernels (on a [16, 128] tile) and the loop's
  query update, for each k in `kernels`, in the while loop and unrolled. No
  decode step of k launches can take less here (PERF_NOTES: the batch-1
  target against it)."""
  from jax.experimental import pallas as pl

  def tiny(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 0.5 + 1.0

  call = pl.pallas_call(tiny, out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32),
                        interpret=interpret)

  def chain(k):
    def attend(x):
      for _ in range(k):
        x = call(x)
      return x
    return attend

  x = jnp.ones((16, 128), jnp.float32)
  name = lambda k, unroll: f"{k} kernel{'s' * (k != 1)}{', unrolled' if unroll else ''}"
  return {name(k, unroll): timed(steps_loop(chain(k), unroll), x, reps=reps)
          for unroll in (False, True) for k in kernels}


def check_kernel(config, *operands) -> dict:
  """The Pallas step against the XLA one on the timed inputs: output error
  (max |diff| / max |ref|) and the share of (sequence, group) selections that agree."""
  run = lambda impl: jax.jit(lambda *a: decode.nsa_decode(
      *a, config=config, impl=impl, return_block_idx=True))(*operands)
  (o, idx), (o_ref, idx_ref) = run("pallas"), run("xla")
  o, o_ref = o.astype(jnp.float32), o_ref.astype(jnp.float32)
  same = (jnp.sort(idx, axis=-1) == jnp.sort(idx_ref, axis=-1)).all(axis=-1)
  return dict(o_rel_err=float(jnp.abs(o - o_ref).max() / jnp.abs(o_ref).max()),
              selection_agreement=float(same.mean()),
              finite=bool(jnp.isfinite(o).all()))


# Odd shapes the kernel must get right before anything is timed (name, T, B,
# HKV, G, Dk, Dv, dtype, config); lengths are drawn in 1 .. T.
CHECKS = [("G3 Dk!=Dv", 300, 3, 2, 3, 64, 32, "float32", NSAConfig()),
          ("G2 Dk!=Dv", 2100, 2, 2, 2, 32, 64, "float32", NSAConfig()),
          ("G1", 5000, 2, 4, 1, 128, 128, "bfloat16", NSAConfig()),
          ("small blocks", 130, 2, 1, 16, 16, 16, "float32",
           NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=4,
                     window=24)),
          ("Config A", 16384, 4, 4, 16, 128, 128, "float32", NSAConfig()),
          ("Config A", 16384, 4, 4, 16, 128, 128, "bfloat16", NSAConfig())]
# max |pallas - xla| / max |xla|: the kernel's float32 dots are single TF32.
CHECK_TOL = {"float32": 2e-3, "bfloat16": 2e-2}


def odd_shape_checks() -> list[dict]:
  """The Pallas step against the XLA one on CHECKS (random lengths)."""
  rows = []
  for i, (name, T, B, HKV, G, Dk, Dv, dtype, config) in enumerate(CHECKS):
    S, Sc = decoding.cache_rows(config, T)
    ks = jax.random.split(jax.random.key(100 + i), 9)
    rnd = lambda k, shape: jax.random.normal(k, shape, dtype)
    operands = (rnd(ks[0], (B, HKV * G, Dk)), rnd(ks[1], (B, Sc, HKV, Dk)),
                rnd(ks[2], (B, Sc, HKV, Dv)), rnd(ks[3], (B, S, HKV, Dk)),
                rnd(ks[4], (B, S, HKV, Dv)), rnd(ks[5], (B, S, HKV, Dk)),
                rnd(ks[6], (B, S, HKV, Dv)), jax.nn.sigmoid(rnd(ks[7], (B, HKV * G, 3))),
                jax.random.randint(ks[8], (B,), 1, T + 1).at[0].set(T))
    row = dict(name=name, T=T, B=B, HKV=HKV, G=G, Dk=Dk, Dv=Dv, dtype=dtype,
               **check_kernel(config, *operands))
    row["ok"] = bool(row["finite"] and row["selection_agreement"] == 1.0
                     and row["o_rel_err"] <= CHECK_TOL[dtype])
    print(f"check {name:>13} T={T:>5} B={B} HKV={HKV} G={G:>2} Dk={Dk:>3} Dv={Dv:>3} {dtype:>8}: "
          f"error {row['o_rel_err']:.1e} (tol {CHECK_TOL[dtype]:.0e}), selections agree "
          f"{100 * row['selection_agreement']:.0f} %  {'ok' if row['ok'] else 'FAILED'}",
          flush=True)
    rows.append(row)
  return rows


def bandwidths(reps: int) -> tuple[float, float]:
  """(read, copy) bytes/s over a 1 GiB bf16 array: a sum (reads only, as a
  decode step does) and x + 1 (read + write)."""
  x = jax.random.normal(jax.random.key(0), (1 << 29,), jnp.bfloat16)
  read = x.nbytes / (median_ms(jax.jit(lambda x: x.sum(dtype=jnp.float32)), x, runs=reps) / 1e3)
  copy = 2 * x.nbytes / (median_ms(jax.jit(lambda x: x + 1), x, runs=reps) / 1e3)
  return read, copy


def nsa_bytes(config: NSAConfig, T: int, B: int, HKV: int, Dk: int, Dv: int, itemsize: int) -> int:
  """K/V bytes one NSA step reads at context T: compressed, selected, window."""
  keys = (config.num_compressed(T) + min(config.num_selected * config.select_block, T)
          + min(config.window, T))
  return B * HKV * keys * (Dk + Dv) * itemsize


def main():
  args = parse_args()
  on_gpu = jax.default_backend() == "gpu"
  if args.small:
    contexts, batches = [512, 1024], [1, 2]
    HQ, HKV, D, dtype = 8, 2, 32, jnp.float32
    args.reps = 2
  else:
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    HQ, HKV, D, dtype = 64, 4, 128, jnp.bfloat16
  config = NSAConfig()
  itemsize = jnp.dtype(dtype).itemsize
  device = jax.devices()[0]
  mem_limit = (device.memory_stats() or {}).get("bytes_limit") if on_gpu else None
  checks = odd_shape_checks() if on_gpu else []
  failed = [f"{c['name']} {c['dtype']}" for c in checks if not c["ok"]]
  if failed:
    raise SystemExit(f"decode kernel checks failed, nothing timed: {failed}")
  probe_bw, copy_bw = bandwidths(args.reps) if on_gpu else (float("nan"), float("nan"))
  print(f"device: {device.device_kind}; jax {jax.__version__}; "
        f"read probe {probe_bw / 1e9:.0f} GB/s, copy {copy_bw / 1e9:.0f} GB/s")
  floor = launch_floor(args.reps) if on_gpu else launch_floor(
      args.reps, kernels=(0, 1), interpret=True) if args.small else {}
  print("loop floor per step (no attention): " + ", ".join(
      f"{name} {sec * 1e6:.1f} us" for name, sec in floor.items()), flush=True)

  known = {"nsa_pallas": "pallas", "nsa_xla": "xla", "dense_cudnn": "cudnn", "dense_xla": "xla"}
  methods = {m: known[m] for m in args.methods.split(",")
             if m in known and (on_gpu or m != "dense_cudnn")}
  results = []
  for T in contexts:
    S, Sc = decoding.cache_rows(config, T)
    for B in batches:
      cache_bytes = B * HKV * (4 * S + 2 * Sc) * D * itemsize
      if mem_limit and cache_bytes > 0.6 * mem_limit:
        print(f"T={T} B={B}: skipped, caches need {cache_bytes / 2**30:.1f} GiB")
        continue
      ks = jax.random.split(jax.random.key(T + B), 8)
      rnd = jax.jit(lambda k, shape: jax.random.normal(k, shape, dtype), static_argnums=1)
      q = rnd(ks[0], (B, HQ, D))
      k_cmp, v_cmp = rnd(ks[1], (B, Sc, HKV, D)), rnd(ks[2], (B, Sc, HKV, D))
      k_slc, v_slc = rnd(ks[3], (B, S, HKV, D)), rnd(ks[4], (B, S, HKV, D))
      k_win, v_win = rnd(ks[5], (B, S, HKV, D)), rnd(ks[6], (B, S, HKV, D))
      gates = jax.nn.sigmoid(rnd(ks[7], (B, HQ, 3)))
      lengths = jnp.full((B,), T, jnp.int32)
      row = dict(T=T, B=B)
      if "nsa_pallas" in methods:
        row.update(check_kernel(config, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates,
                                lengths))
      for name, impl in methods.items():
        if name.startswith("nsa"):
          attend = lambda q, *c, impl=impl: decode.nsa_decode(
              q, *c, config=config, impl=impl)
          operands = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths)
        else:
          attend = lambda q, k, v, n, impl=impl: jax.nn.dot_product_attention(
              q[:, None], k, v, key_value_seq_lengths=n, implementation=impl)[:, 0]
          operands = (q, k_slc, v_slc, lengths)
        try:
          loop = steps_loop(attend, args.unroll)
          row[name] = timed(loop, *operands, reps=args.reps)
          if name == "nsa_pallas" and T == args.breakdown:
            # us per step by kernel (and XLA fusion), from a profiler trace of the same loop
            row["nsa_pallas_breakdown"] = [(op, us / STEPS, n // STEPS)
                                           for op, us, n in device_op_times(loop, *operands)[:16]]
        except Exception as e:  # cuDNN may refuse a shape: record why, keep going
          row[name] = None
          row[name + "_error"] = f"{type(e).__name__}: {str(e)[:400]}"
      row["nsa_bytes"] = nsa_bytes(config, T, B, HKV, D, D, itemsize)
      row["dense_bytes"] = B * HKV * T * 2 * D * itemsize
      results.append(row)
      dense = [row[m] for m in ("dense_cudnn", "dense_xla") if row.get(m)]
      nsa = row.get("nsa_pallas")
      if "o_rel_err" in row:
        print(f"T={T:>6} B={B:>2}  check pallas vs xla: output error {row['o_rel_err']:.1e}, "
              f"selections agree {100 * row['selection_agreement']:.1f} %, "
              f"finite {row['finite']}")
      line = f"T={T:>6} B={B:>2}  " + "  ".join(
          f"{m}={row[m] * 1e3:.3f}ms" if row.get(m) else f"{m}=n/a" for m in methods)
      if nsa and dense:
        line += f"  speedup(best dense / nsa_pallas)={min(dense) / nsa:.1f}x"
      print(line, flush=True)
      for op, us, n in row.get("nsa_pallas_breakdown", []):
        print(f"    {us:8.1f} us  x{n:<3d} {op[:110]}")
      for name in methods:
        if row.get(name + "_error"):
          print(f"    {name}: {row[name + '_error']}")
      del q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, operands
      gc.collect()

  # The GPU's read bandwidth: the best of the sum probe and dense decoding's
  # effective rate (cuDNN streams the whole cache; it beats the probe).
  dense_rates = [r["dense_bytes"] / r[m] for r in results
                 for m in ("dense_cudnn", "dense_xla") if r.get(m)]
  bw = max([probe_bw] + dense_rates) if on_gpu else probe_bw
  for r in results:
    if r.get("nsa_pallas") and on_gpu:
      r["nsa_byte_time"] = r["nsa_bytes"] / bw
      print(f"T={r['T']:>6} B={r['B']:>2}  NSA reads {r['nsa_bytes'] / 1e6:7.2f} MB per step: "
            f"{r['nsa_byte_time'] * 1e6:6.1f} us at {bw / 1e9:.0f} GB/s; measured "
            f"{r['nsa_pallas'] * 1e6:6.1f} us = {r['nsa_pallas'] / r['nsa_byte_time']:.2f}x "
            f"the byte time")
  if args.out is None:
    args.out = tempfile.mkdtemp(prefix="bench_decode_") if args.small else default_out_dir()
  os.makedirs(args.out, exist_ok=True)
  meta = dict(device=device.device_kind, jax=jax.__version__, read_bandwidth_Bps=bw,
              probe_bandwidth_Bps=probe_bw, copy_bandwidth_Bps=copy_bw, launch_floor_s=floor,
              HQ=HQ, HKV=HKV, Dk=D, Dv=D, dtype=jnp.dtype(dtype).name, steps_per_timing=STEPS,
              reps=args.reps, config=config.__dict__, small=args.small, unroll=args.unroll)
  with open(os.path.join(args.out, "decode_bench.json"), "w") as f:
    json.dump(dict(meta=meta, checks=checks, results=results), f, indent=1)
  plot(results, list(methods), batches, os.path.join(args.out, "decode_bench.png"), meta)
  print(f"wrote {args.out}/decode_bench.json and decode_bench.png")
  for r in results:
    dense = [r[m] for m in ("dense_cudnn", "dense_xla") if r.get(m)]
    if r["T"] == 65536 and r["B"] in (1, 32) and r.get("nsa_pallas") and dense:
      x = min(dense) / r["nsa_pallas"]
      print(f"target check T=64k B={r['B']}: {x:.1f}x faster than the best dense "
            f"({'meets' if x >= 10 else 'misses'} the 10x target)")


def plot(results, methods, batches, path, meta):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
  for ax, B in zip(axes[0], batches):
    rows = [r for r in results if r["B"] == B]
    for m in methods:
      pts = [(r["T"], r[m] * 1e3) for r in rows if r.get(m)]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=m)
    for r in rows:
      dense = [r[m] for m in ("dense_cudnn", "dense_xla") if r.get(m)]
      if r.get("nsa_pallas") and dense:
        ax.annotate(f"{min(dense) / r['nsa_pallas']:.1f}x", (r["T"], r["nsa_pallas"] * 1e3),
                    textcoords="offset points", xytext=(0, -12), ha="center", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="context T", ylabel="ms per decode step",
           title=f"batch {B}")
    ax.legend(fontsize=7)
  fig.suptitle(f"decode attention, {meta['device']}, HQ={meta['HQ']} HKV={meta['HKV']} "
               f"D={meta['Dk']} {meta['dtype']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
