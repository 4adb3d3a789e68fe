"""GPU check and benchmark of the selected-attention Pallas kernel.

    PYTHONPATH=. python experiments/check_selected.py           # on a GPU
    PYTHONPATH=. python experiments/check_selected.py --small   # CPU, interpret mode

1. Correctness: kernel vs `selected_attention_xla` (run at "highest" matmul
   precision, float32 math) for the forward output and the q, k, v gradients
   of a random cotangent, G = 16, bf16 and float32, block_idx from the XLA
   `select_blocks` on random q / compressed keys. Error = max |diff| / max |ref|.
2. Timing: Config A of SPEC §5 (B=1, HQ=64, HKV=4, Dk=Dv=128, bf16, paper
   block sizes), forward and forward+backward, median of >= 10 runs after a
   warm-up, for the default tiles, the deterministic dK/dV variant
   (`dkv_tiles=None`) and the block-major kernels (`block_major=True`), each
   `default_tiles` with those fields changed; the XLA reference forward where
   it is cheap; the default tiles, 16/64-row tiles, query tiles and
   block-major again with block_idx from smoothed queries, where timed (random
   queries make neighbouring tokens select unrelated blocks, the worst case
   for the kernel's per-tile block union; real queries are correlated); and
   tuning candidates (tile rows, dK/dV rows per step and chunk, block-major
   rows and chunks) at the largest T.
   Each row also reports the mean number of distinct blocks per tile of Bq
   tokens (the blocks the forward reads per tile).

Prints a table; writes the numbers as JSON to $OUT/check_selected.json when
$OUT is set, after each stage, so a run cut short keeps what it measured.
Options: --ts, --check-ts, --skip-check, --no-extras, --extras (name prefixes),
--runs, --groups (G sweep: default (chosen per call), query tiles, block-major;
random and smoothed queries).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import bench_common
import nsa_jax
from bench_common import SMALL_SHAPE, median_ms, small_config
from nsa_jax import NSAConfig
from nsa_jax.ops.selected import selected_attention_xla
from pallas_kernels.selected_attention import default_tiles, selected_attention

# Tolerances on max|diff| / max|ref|. float32: on the GPU the kernel's
# float32 dots run as one TF32 pass (10-bit mantissa): 3e-4 .. 8e-4 measured
# on an H200 at 8k (`results/check_selected_h200_v6_block_fwd.json`), as in
# gpu_check's 1e-3; the CPU (interpret mode) is exact float32. bf16 rounds q,
# k, v, p and the output to 8 bits of mantissa.
TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2}


def make_inputs(key, B, T, HKV, G, Dk, Dv, config, dtype):
  kq, kk, kv, kc, kg = jax.random.split(key, 5)
  q = jax.random.normal(kq, (B, T, HKV * G, Dk), jnp.float32)
  k = jax.random.normal(kk, (B, T, HKV, Dk), jnp.float32)
  v = jax.random.normal(kv, (B, T, HKV, Dv), jnp.float32)
  k_cmp = jax.random.normal(kc, (B, config.num_compressed(T), HKV, Dk), jnp.float32)
  block_idx = jax.jit(lambda q, c: nsa_jax.select_blocks(
      q, c, config=config, impl="xla"))(q, k_cmp)
  ct = jax.random.normal(kg, (B, T, HKV * G, Dv), jnp.float32)
  cast = lambda x: x.astype(dtype)
  return cast(q), cast(k), cast(v), block_idx, cast(ct)


def kernel_fn(config, scale, interpret, tiles):
  """The kernel with `default_tiles` (which depend on dtype and head dims)
  updated by the dict `tiles`."""
  return lambda q, k, v, b: selected_attention(
      q, k, v, b, config=config, scale=scale, interpret=interpret,
      tiles=dataclasses.replace(default_tiles(q, k), **tiles))


def reference_fn(config, scale):
  def f(q, k, v, b):
    with jax.default_matmul_precision("highest"):
      return selected_attention_xla(q, k, v, b, config=config, scale=scale)
  return f


def fwd_bwd(fn):
  """jit of (o, dq, dk, dv) for a cotangent ct."""
  def run(q, k, v, b, ct):
    o, vjp = jax.vjp(lambda *a: fn(*a, b), q, k, v)
    return (o, *vjp(ct))
  return jax.jit(run)


def check(T, dtype, config, interpret, tiles, key, B, HKV, G, D):
  scale = D ** -0.5
  q, k, v, b, ct = make_inputs(key, B, T, HKV, G, D, D, config, dtype)
  got = fwd_bwd(kernel_fn(config, scale, interpret, tiles))(q, k, v, b, ct)
  f32 = lambda x: x.astype(jnp.float32)
  want = fwd_bwd(reference_fn(config, scale))(f32(q), f32(k), f32(v), b, f32(ct))
  errors = {}
  for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
    g = f32(g)
    finite = bool(jnp.all(jnp.isfinite(g)))
    errors[name] = float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) if finite else float("inf")
  ok = all(e <= TOLERANCE[jnp.dtype(dtype).name] for e in errors.values())
  return {"T": T, "dtype": jnp.dtype(dtype).name, "tiles": repr(tiles),
          "errors": errors, "ok": ok}


def smooth_block_idx(q, key, config, HKV, width=256):
  """block_idx of queries averaged over `width` neighbouring tokens."""
  B, T, _, D = q.shape
  c = jnp.cumsum(q.astype(jnp.float32), axis=1)
  c = c - jnp.pad(c, [(0, 0), (width, 0), (0, 0), (0, 0)])[:, :T]
  q_smooth = c / jnp.sqrt(jnp.minimum(jnp.arange(1, T + 1), width))[None, :, None, None]
  k_cmp = jax.random.normal(jax.random.fold_in(key, 1),
                            (B, config.num_compressed(T), HKV, D), jnp.float32)
  return jax.jit(lambda q, c: nsa_jax.select_blocks(
      q, c, config=config, impl="xla"))(q_smooth, k_cmp)


def mean_union_sizes(block_idx, tile_tokens):
  """Mean number of distinct blocks per tile of Bq consecutive tokens, per Bq.

  The forward reads (and computes on) this many blocks per tile: Bq * n when
  neighbouring tokens share nothing (random inputs), n when they agree.
  """
  b = np.asarray(block_idx)
  B, T, HKV, n = b.shape
  sizes = {}
  for bq in tile_tokens:
    t = T - T % bq
    x = b[:, :t].reshape(B, t // bq, bq, HKV, n).transpose(0, 1, 3, 2, 4)
    x = np.sort(x.reshape(B, t // bq, HKV, bq * n), axis=-1)
    distinct = (x >= 0) & np.concatenate(
        [np.ones_like(x[..., :1], bool), x[..., 1:] != x[..., :-1]], axis=-1)
    sizes[bq] = float(distinct.sum(-1).mean())
  return sizes


def bench(T, config, interpret, variants, runs, key, B, HKV, G, D,
          xla_up_to=16384):
  scale = D ** -0.5
  q, k, v, b, ct = make_inputs(key, B, T, HKV, G, D, D, config, jnp.bfloat16)
  # Forward FLOPs actually attended (QK^T and PV over visible keys).
  t = jnp.arange(T)[None, :, None, None]
  visible = jnp.clip(t - b * config.select_block + 1, 0, config.select_block)
  keys = float(jnp.sum(jnp.where(b >= 0, visible, 0), dtype=jnp.float32))   # > 2^31 at G = 1
  flops = 2.0 * keys * G * (D + D)
  row = {"T": T, "fwd_tflop": flops / 1e12, "ms": {},
         "mean_union": mean_union_sizes(b, (1, 2, 4, 8))}
  for name, tiles in variants.items():
    fn = kernel_fn(config, scale, interpret, tiles)
    fwd = jax.jit(fn)
    row["ms"][f"{name} fwd"] = median_ms(fwd, q, k, v, b, runs=runs)
    row["ms"][f"{name} fwd+bwd"] = median_ms(fwd_bwd(fn), q, k, v, b, ct, runs=runs)
  # Real queries change slowly along t, so neighbours select alike: time the
  # default tiles again with block_idx from a 256-token moving average of q.
  b_smooth = smooth_block_idx(q, key, config, HKV)
  row["mean_union_smooth"] = mean_union_sizes(b_smooth, (1, 2, 4, 8))
  for name in ("default", "rows16", "rows64", "query-tiles", "block-major"):
    if name in variants:
      fn = kernel_fn(config, scale, interpret, variants[name])
      row["ms"][f"{name} fwd, smooth q"] = median_ms(jax.jit(fn), q, k, v, b_smooth, runs=runs)
      row["ms"][f"{name} fwd+bwd, smooth q"] = median_ms(
          fwd_bwd(fn), q, k, v, b_smooth, ct, runs=runs)
  # Where the time goes, per kernel (profiler).
  row["breakdown_us"] = {} if interpret else {next(iter(variants)): bench_common.device_op_times(
      fwd_bwd(kernel_fn(config, scale, interpret, next(iter(variants.values())))), q, k, v, b, ct)}
  if T <= xla_up_to:
    ref = jax.jit(reference_fn(config, scale))
    row["ms"]["xla-ref fwd"] = median_ms(ref, q, k, v, b, runs=runs)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="tiny shapes in interpret mode (CPU smoke test)")
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--ts", type=int, nargs="+",
                      default=[8192, 16384, 32768, 65536],
                      help="sequence lengths to time (extras at the largest)")
  parser.add_argument("--skip-check", action="store_true")
  parser.add_argument("--no-extras", action="store_true",
                      help="skip the tuning candidates at the largest T")
  parser.add_argument("--check-ts", type=int, nargs="+", default=[8192, 16384],
                      help="sequence lengths of the correctness checks")
  parser.add_argument("--extras", nargs="*", default=[],
                      help="time only the tuning candidates whose names start with these")
  parser.add_argument("--groups", type=int, nargs="*", default=[],
                      help="GQA group sizes G to sweep at the largest T (HQ = 64, HKV = 64 / G), "
                           "each by default, query tiles and block-major kernels")
  args = parser.parse_args()

  if args.small:
    config, shape = small_config(), SMALL_SHAPE
    check_ts, bench_ts, runs, interpret = [48], [64], 2, True
  else:
    config = NSAConfig()
    check_ts, runs, interpret = args.check_ts, args.runs, False
    bench_ts = sorted(args.ts)
    shape = dict(B=1, HKV=4, G=16, D=128)   # Config A
  # Each variant updates `default_tiles` by these fields.
  variants = {"default": {}, "deterministic": dict(dkv_tiles=None),
              "block-major": dict(block_major=True)}
  # Tuning candidates, timed at the largest T only.
  fixed = lambda rows, **kw: dict(rows=rows, wide_rows=None, **kw)   # one tiling, no cond
  extras = {
      "rows16": fixed(16), "rows32": fixed(32), "rows64": fixed(64),
      **{f"dkv-rows{r}": dict(dkv_rows=r) for r in (16, 64, 256)},
      "dkv-tiles512": dict(dkv_tiles=512), "warps2": dict(num_warps=2), "warps4": dict(num_warps=4),
      "warps8": dict(num_warps=8),
      **{f"block-rows{r}": dict(block_major=True, block_rows=r) for r in (32, 128)},
      **{f"block-dkv-rows{r}": dict(block_major=True, dkv_rows=r)
         for r in (32, 64)},
      **{f"block-entries{e}": dict(block_major=True, block_entries=e)
         for e in (128, 1024)}}
  extras = {} if args.no_extras else {
      name: tiles for name, tiles in extras.items()
      if not args.extras or any(name.startswith(prefix) for prefix in args.extras)}
  key = jax.random.key(0)
  device = jax.devices()[0].device_kind
  result = {"device": device, "jax": jax.__version__,
            "config": dataclasses.asdict(config), "shape": shape,
            "variants": {k: repr(t) for k, t in {**variants, **extras}.items()},
            "checks": [], "bench": []}

  def save():
    result["all_ok"] = all(c["ok"] for c in result["checks"])
    if os.environ.get("OUT"):
      with open(os.path.join(os.environ["OUT"], "check_selected.json"), "w") as f:
        json.dump(result, f, indent=1)

  print(f"device: {device}, jax {jax.__version__}", flush=True)
  for T in [] if args.skip_check else check_ts:
    for dtype in (jnp.float32, jnp.bfloat16):
      for name, tiles in variants.items():
        r = check(T, dtype, config, interpret, tiles, key, **shape)
        result["checks"].append(r)
        errs = " ".join(f"{k}={e:.1e}" for k, e in r["errors"].items())
        print(f"check T={T:6d} {r['dtype']:8s} {name:13s} {errs}  "
              f"{'OK' if r['ok'] else 'FAIL'}", flush=True)
  save()

  for T in bench_ts:
    timed = {**variants, **extras} if T == bench_ts[-1] else variants
    r = bench(T, config, interpret, timed, runs, key, **shape)
    result["bench"].append(r)
    save()
    tflops = r["fwd_tflop"] / (r["ms"]["default fwd"] * 1e-3)
    print(f"bench T={T:6d} (default fwd {tflops:.0f} TFLOP/s; mean blocks per "
          f"tile of Bq tokens {r['mean_union']})", flush=True)
    for name, ms in r["ms"].items():
      print(f"    {name:28s} {ms:9.3f} ms", flush=True)
    for name, ops in r["breakdown_us"].items():
      print(f"    {name} fwd+bwd by kernel: "
            + ", ".join(f"{op.split(': ')[-1]} {us / 1e3:.2f} ms" for op, us, _ in ops[:6]), flush=True)
  for G in args.groups:
    shape_g = dict(shape, HKV=shape["HKV"] * shape["G"] // G, G=G)
    rows = {"default": {}, "query-tiles": dict(block_major=False),
            "block-major": variants["block-major"]}
    r = bench(bench_ts[-1], config, interpret, rows, runs, key, **shape_g)
    result.setdefault("g_sweep", []).append({"G": G, **r})
    save()
    print(f"G={G} T={bench_ts[-1]} (HKV={shape_g['HKV']}; mean blocks per tile of Bq tokens "
          f"{r['mean_union']}, smooth q {r['mean_union_smooth']})", flush=True)
    for name, ms in r["ms"].items():
      print(f"    {name:28s} {ms:9.3f} ms", flush=True)
  print("all checks OK" if result["all_ok"] else "SOME CHECKS FAILED")


if __name__ == "__main__":
  main()
