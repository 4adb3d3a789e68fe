"""GPU check and benchmark of the banded flash-attention kernels (window and compressed).

    PYTHONPATH=. python experiments/check_flash.py            # on a GPU
    PYTHONPATH=. python experiments/check_flash.py --small    # CPU, interpret mode

1. Correctness: `pallas_kernels.window_attention` and
   `pallas_kernels.compressed_attention` vs their XLA references (float32
   math at "highest" matmul precision) at Config A shapes (G = 16), T = 8k and
   16k, bf16 and float32: output, lse (compressed), and the q, k, v gradients
   of random cotangents (one on lse too). Error = max |diff| / max |ref|;
   exits non-zero on a mismatch or a non-finite value.
2. Timing: Config A of SPEC §5 (B=1, HQ=64, HKV=4, Dk=Dv=128, bf16, w=512,
   l=32, d=16) for T = 8k .. 64k, forward and forward+backward (jit, warm-up,
   block_until_ready, median of >= 10 runs, fresh random inputs per T), with
   cuDNN's sliding-window attention as a yardstick for the window branch.
3. Floor: matmul FLOPs over visible (query, key) pairs -- forward
   2 FLOP x pairs x HQ x (Dk + Dv), backward 2.5x that -- over a bf16
   matmul rate measured in this run (KERNELS.md targets: forward within 2x).
4. Tile sweep (skip with --no-sweep, pick with --variants): changes to each
   op's default `Tiles`, timed at the largest T and checked in bf16 at the
   largest check T (a fast variant must also be right: 2-stage backward loops
   miscompiled, see `_flash.Tiles.bwd_num_stages`). Options --skip-check,
   --ops, --ts narrow the run; --config-b checks and times Dk=192, Dv=128.

Prints tables; writes everything as JSON to $OUT/check_flash.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import median_ms, small_config
from nsa_jax import NSAConfig, compressed_attention, window_attention
from nsa_jax.ops.compressed import compressed_attention_xla
from nsa_jax.ops.window import window_attention_xla
from pallas_kernels import compressed_attention as cmp_kernel
from pallas_kernels import window_attention as win_kernel

# max|diff| / max|ref|: float32 differs in summation order only; bf16 rounds
# q, k, v, p and the outputs to 8 mantissa bits: correct kernels land at
# <= 5e-3 here (cuDNN's window attention too), while a miscompiled 2-stage
# dk/dv loop gave 1.6e-2 .. 3.4e-2 (see _flash.Tiles.bwd_num_stages).
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}
OPS = ("window", "compressed")
# The same ops run by cuDNN (GPU only, the paths `nsa` takes there), checked
# and timed like the kernels with `--ops window-cudnn,compressed-cudnn`. The
# compressed one folds the stride residues into the batch
# (`compressed_attention_folded`); its lse carries no gradient, so its check
# puts a zero cotangent on lse.
CUDNN_WINDOW, CUDNN_COMPRESSED = "window-cudnn", "compressed-cudnn"
CUDNN_OPS = (CUDNN_WINDOW, CUDNN_COMPRESSED)
# Tile sweep: changes to each op's default tiles for the heads run (`default_tiles`).
# No backward stage variants: 2 stages miscompile the dk/dv loop (_flash.Tiles).
SWEEP = {
    "bwd-k128": dict(bwd_block_k=128),
    "bwd-m32-k128-w4": dict(bwd_block_m=32, bwd_block_k=128, bwd_num_warps=4),
    "bwd-m128-w8": dict(bwd_block_m=128, bwd_num_warps=8),
    "bwd-w4": dict(bwd_num_warps=4),
    "bwd-w8": dict(bwd_num_warps=8),
    "bwd-m32": dict(bwd_block_m=32),
    "splits8": dict(dkv_splits=8),
    "splits32": dict(dkv_splits=32),
    "fwd-m64-w4": dict(block_m=64, num_warps=4),
}


def default_tiles(op, shape):
  """The op's default tiles for bf16 inputs with these heads (what the sweep changes)."""
  if op == "compressed":
    return cmp_kernel.default_tiles(jax.ShapeDtypeStruct((1, 1, 1, shape["Dk"]), jnp.bfloat16))
  return win_kernel.TILES


def op_fn(op, config, scale, interpret, tiles=None):
  """(q, k, v) -> tuple of outputs: (o,) for window, (o, lse) for compressed."""
  if op == CUDNN_WINDOW:
    return lambda q, k, v: (window_attention(q, k, v, config=config, scale=scale,
                                             impl="cudnn"),)
  if op == CUDNN_COMPRESSED:
    return lambda q, k, v: compressed_attention(q, k, v, config=config, scale=scale,
                                                impl="cudnn")
  if op == "window":   # tiles=None: the op's defaults for the dtype
    return lambda q, k, v: (win_kernel.window_attention(
        q, k, v, config=config, scale=scale, interpret=interpret, tiles=tiles),)
  return lambda q, k, v: cmp_kernel.compressed_attention(
      q, k, v, config=config, scale=scale, interpret=interpret, tiles=tiles)


def reference_fn(op, config, scale):
  def f(q, k, v):
    with jax.default_matmul_precision("highest"):
      if not op.startswith("compressed"):
        return (window_attention_xla(q, k, v, config=config, scale=scale),)
      return compressed_attention_xla(q, k, v, config=config, scale=scale)
  return f


def make_inputs(key, op, T, B, HKV, G, Dk, Dv, config, dtype):
  """q, k, v and cotangents for every output (never zero)."""
  S = config.num_compressed(T) if op.startswith("compressed") else T
  ks = jax.random.split(key, 5)
  normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype)
  q = normal(ks[0], (B, T, HKV * G, Dk))
  k = normal(ks[1], (B, S, HKV, Dk))
  v = normal(ks[2], (B, S, HKV, Dv))
  cts = (normal(ks[3], (B, T, HKV * G, Dv)),)
  if op.startswith("compressed"):
    cts += (jax.random.normal(ks[4], (B, T, HKV * G), jnp.float32)
            * (op != CUDNN_COMPRESSED),)
  return q, k, v, cts


def fwd_bwd(fn):
  """jit of (outputs, dq, dk, dv) for cotangents cts."""
  def run(q, k, v, cts):
    out, vjp = jax.vjp(fn, q, k, v)
    return (*out, *vjp(cts))
  return jax.jit(run)


def check(op, T, dtype, config, interpret, key, B, HKV, G, Dk, Dv, tiles=None):
  scale = Dk ** -0.5
  q, k, v, cts = make_inputs(key, op, T, B, HKV, G, Dk, Dv, config, dtype)
  got = fwd_bwd(op_fn(op, config, scale, interpret, tiles))(q, k, v, cts)
  f32 = lambda x: x.astype(jnp.float32)
  want = fwd_bwd(reference_fn(op, config, scale))(
      f32(q), f32(k), f32(v), jax.tree.map(f32, cts))
  names = ("o",) + (("lse",) if op.startswith("compressed") else ()) + ("dq", "dk", "dv")
  errors = {}
  for name, g, w in zip(names, got, want):
    g, w = np.asarray(f32(g)), np.asarray(w)
    same_inf = np.array_equal(np.isneginf(g), np.isneginf(w))   # lse rows that see nothing
    g, w = np.where(np.isneginf(w), 0.0, g), np.where(np.isneginf(w), 0.0, w)
    finite = same_inf and np.isfinite(g).all()
    errors[name] = (float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30))
                    if finite else float("inf"))
  ok = all(e <= TOLERANCE[jnp.dtype(dtype).name] for e in errors.values())
  return {"op": op, "T": T, "dtype": jnp.dtype(dtype).name, "errors": errors,
          "ok": ok}


def visible_pairs(op, T, config):
  """Number of (query, key) pairs the op attends to, summed over t."""
  t = np.arange(T, dtype=np.int64)
  if not op.startswith("compressed"):
    return int(np.minimum(t + 1, config.window).sum())
  l, d = config.compress_block, config.compress_stride
  n = np.clip((t - l + 1) // d + 1, 0, config.num_compressed(T))
  return int(np.where(t >= l - 1, n, 0).sum())


def matmul_tflops(runs, interpret):
  """bf16 matmul rate measured here (TFLOP/s)."""
  n = 256 if interpret else 8192
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
  ms = median_ms(jax.jit(jnp.matmul), a, b, runs=runs)
  return 2 * n ** 3 / (ms * 1e-3) / 1e12


def cudnn_window_ms(q, k, v, config, scale, runs):
  """cuDNN sliding-window attention forward, or None where unavailable."""
  try:
    return median_ms(jax.jit(op_fn(CUDNN_WINDOW, config, scale, False)), q, k, v, runs=runs)
  except Exception as e:   # no cuDNN, or a shape it rejects
    print(f"  (cuDNN window attention unavailable: {type(e).__name__}: {str(e)[:120]})")
    return None


def bench(op, T, config, interpret, runs, key, B, HKV, G, Dk, Dv, tiles=None,
          with_cudnn=False):
  scale = Dk ** -0.5
  q, k, v, cts = make_inputs(key, op, T, B, HKV, G, Dk, Dv, config, jnp.bfloat16)
  fn = op_fn(op, config, scale, interpret, tiles)
  flop = 2 * (Dk + Dv) * visible_pairs(op, T, config) * B * HKV * G
  row = {"op": op, "T": T, "fwd_tflop": flop / 1e12,
         "fwd_ms": median_ms(jax.jit(fn), q, k, v, runs=runs),
         "fwd_bwd_ms": median_ms(fwd_bwd(fn), q, k, v, cts, runs=runs)}
  if with_cudnn and op == "window" and not interpret:
    row["cudnn_window_fwd_ms"] = cudnn_window_ms(q, k, v, config, scale, runs)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="tiny shapes in interpret mode (CPU smoke test)")
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--max-t", type=int, default=65536)
  parser.add_argument("--no-sweep", action="store_true",
                      help="skip the tile sweep at the largest T")
  parser.add_argument("--skip-check", action="store_true", help="skip the correctness checks")
  parser.add_argument("--ops", default=",".join(OPS),
                      help=f"subset of {','.join(OPS + CUDNN_OPS)}")
  parser.add_argument("--ts", type=int, nargs="+", default=None,
                      help="sequence lengths to time (default 8k .. --max-t)")
  parser.add_argument("--variants", default=",".join(SWEEP),
                      help="comma-separated subset of the tile sweep")
  parser.add_argument("--config-b", action="store_true",
                      help="Config B heads: Dk=192, Dv=128 (default Config A: 128, 128)")
  args = parser.parse_args()

  if args.small:
    config = small_config()
    shape = dict(B=1, HKV=1, G=16, Dk=24 if args.config_b else 16, Dv=16)
    check_ts, bench_ts, runs, interpret = [45], [64], 2, True
  else:
    config = NSAConfig()
    check_ts, runs, interpret = [8192, 16384], max(args.runs, 10), False
    bench_ts = args.ts or [T for T in (8192, 16384, 32768, 65536) if T <= args.max_t]
    shape = dict(B=1, HKV=4, G=16, Dk=192 if args.config_b else 128, Dv=128)
  key = jax.random.key(0)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "config": dataclasses.asdict(config), "shape": shape,
            "tiles": {op: repr(default_tiles(op, shape)) for op in OPS},
            "checks": [], "bench": [], "sweep": []}
  print(f"device: {result['device']}, jax {result['jax']}, shape {shape}")

  ops = args.ops.split(",")
  print("\n== correctness vs XLA reference (max|diff| / max|ref|)")
  for op in ops:
    for T in [] if args.skip_check else check_ts:
      # cuDNN's fused attention takes 16-bit inputs only.
      for dtype in (jnp.bfloat16,) if op in CUDNN_OPS else (jnp.float32, jnp.bfloat16):
        key, sub = jax.random.split(key)
        r = check(op, T, dtype, config, interpret, sub, **shape)
        result["checks"].append(r)
        errs = "  ".join(f"{n} {e:.1e}" for n, e in r["errors"].items())
        print(f"{op:10s} T={T:6d} {r['dtype']:8s} {errs}  "
              f"{'ok' if r['ok'] else 'MISMATCH'}")

  rate = matmul_tflops(runs, interpret)
  result["matmul_tflops"] = rate
  print(f"\n== timing, {shape} bf16 (bf16 matmul rate here: {rate:.0f} TFLOP/s;"
        " floor = matmul FLOPs / that rate, backward = 2.5x forward)")
  print(f"{'op':10s} {'T':>6s} {'fwd ms':>8s} {'floor':>7s} {'x floor':>7s}"
        f" {'fwd+bwd':>8s} {'floor':>7s} {'x floor':>7s} {'cuDNN win fwd':>13s}")
  for T in bench_ts:
    for op in ops:
      key, sub = jax.random.split(key)
      r = bench(op, T, config, interpret, runs, sub, **shape, with_cudnn=True)
      r["fwd_floor_ms"] = r["fwd_tflop"] / rate * 1e3
      r["fwd_bwd_floor_ms"] = 3.5 * r["fwd_floor_ms"]
      result["bench"].append(r)
      cudnn = r.get("cudnn_window_fwd_ms")
      print(f"{op:10s} {T:6d} {r['fwd_ms']:8.2f} {r['fwd_floor_ms']:7.2f}"
            f" {r['fwd_ms'] / r['fwd_floor_ms']:7.2f} {r['fwd_bwd_ms']:8.2f}"
            f" {r['fwd_bwd_floor_ms']:7.2f}"
            f" {r['fwd_bwd_ms'] / r['fwd_bwd_floor_ms']:7.2f}"
            f" {'' if cudnn is None else f'{cudnn:13.2f}'}")

  if not args.no_sweep:
    T = bench_ts[-1]
    print(f"\n== tile sweep at T={T} (ms; defaults above)")
    for name in args.variants.split(","):
      for op in ops:
        tiles = dataclasses.replace(default_tiles(op, shape), **SWEEP[name])
        key, sub = jax.random.split(key)
        try:
          r = bench(op, T, config, interpret, runs, sub, **shape, tiles=tiles)
          if not args.skip_check:
            c = check(op, check_ts[-1], jnp.bfloat16, config, interpret, sub, **shape,
                      tiles=tiles)
            r.update(check_T=c["T"], errors=c["errors"], ok=c["ok"])
        except Exception as e:   # a variant Triton cannot compile
          r = {"op": op, "T": T, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        r.update(variant=name, tiles=repr(tiles))
        result["sweep"].append(r)
        timing = (f"fwd {r['fwd_ms']:7.2f}  fwd+bwd {r['fwd_bwd_ms']:7.2f}"
                  if "error" not in r else r["error"])
        if "errors" in r:
          timing += (f"  bf16 T={r['check_T']} max err {max(r['errors'].values()):.1e} "
                     f"{'ok' if r['ok'] else 'WRONG'}")
        print(f"{name:14s} {op:10s} {timing}")

  out = os.environ.get("OUT")
  if out:
    with open(os.path.join(out, "check_flash.json"), "w") as f:
      json.dump(result, f, indent=1)
  bad = [r for r in result["checks"] if not r["ok"]]
  if bad:
    print(f"\nFAILED: {len(bad)} correctness check(s) out of tolerance")
    sys.exit(1)
  print("\nall correctness checks passed")


if __name__ == "__main__":
  main()
