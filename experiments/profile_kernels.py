"""GPU check and tile profile of one family of Pallas kernels (OP: window, compressed, select,
selected, decode, teacher: the distillation's block lse): the kernels against their reference
first, then timings of the default tiles and of variants of them
(docs/benchmarks.md#kernel-profiles).

    python -m experiments.profile_kernels OP                # on a GPU, Config A
    python -m experiments.profile_kernels OP --config-b     # Dk = 192, Dv = 128
    python -m experiments.profile_kernels OP --heads 256,256 --group 1   # other heads
    python -m experiments.profile_kernels selected --batch 4 --q-heads 16 --group 4  # research
    python -m experiments.profile_kernels OP --small        # CPU, interpret mode
    python -m experiments.profile_kernels select --group-score max   # select, decode: heads' max
    python -m experiments.profile_kernels teacher --batch 2 --q-heads 16 --group 4 --ts 32768

Prints a table last; writes --out (default $OUT, else experiments/results)
/profile_<OP>.json; exits 1 when a check fails. Figures: experiments/PERF_NOTES.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from nsa_jax import NSAConfig, compressed_attention, decoding, select_blocks, window_attention
from nsa_jax.ops import _common, decode
from nsa_jax.ops.compressed import compressed_attention_xla, compressed_scores
from nsa_jax.ops.distill import block_lse_xla
from nsa_jax.ops.selected import selected_attention_xla
from nsa_jax.ops.selection import group_block_scores, select_blocks_xla
from nsa_jax.ops.window import window_attention_xla
from pallas_kernels import block_lse as teacher_kernel
from pallas_kernels import compressed_attention as cmp_kernel
from pallas_kernels import decode_attention, selected_attention
from pallas_kernels import select_blocks as select_kernel
from pallas_kernels import window_attention as win_kernel

VARIANTS = {
    # No backward stage variants: 2 stages miscompile the dk/dv loop (_flash_tiles.Tiles).
    "window": {"bwd-k128": dict(bwd_block_k=128),
               "bwd-m64-w8": dict(bwd_block_m=64, bwd_num_warps=8),
               "fwd-m64-w4": dict(block_m=64, num_warps=4)},
    "compressed": {"bwd-k128": dict(bwd_block_k=128), "bwd-w8": dict(bwd_num_warps=8),
                   "splits8": dict(dkv_splits=8), "splits32": dict(dkv_splits=32),
                   "fwd-m64-w4": dict(block_m=64, num_warps=4)},
    "select": {"bq32": dict(block_q=32), "bq128": dict(block_q=128), "bk64": dict(block_k=64),
               "w2": dict(num_warps=2), "w8": dict(num_warps=8), "stages3": dict(num_stages=3)},
    "selected": {"deterministic": dict(dkv_tiles=None), "block-major": dict(block_major=True),
                 "query-tiles": dict(block_major=False),
                 "wide": dict(block_major=False, rows=64, num_warps=4),
                 "warps2": dict(num_warps=2),
                 "dkv-rows64": dict(dkv_rows=64), "dkv-rows256": dict(dkv_rows=256),
                 "block-rows128": dict(block_major=True, block_rows=128),
                 # Block-major backward: dQ terms in float32 (the default stores them in
                 # the input dtype), longer chunks (fewer dK/dV atomics), 4 warps, and
                 # 64-row steps on one stage (two programs per SM fit in shared memory).
                 "dq-f32": dict(block_major=True, block_dq_float32=True),
                 "block-entries1024": dict(block_major=True, block_entries=1024),
                 "dkv-warps4": dict(block_major=True, dkv_num_warps=4),
                 "dkv-rows64-stages1": dict(block_major=True, dkv_rows=64, num_stages=1),
                 # Block-major in one pass whatever its transient buffers (the default runs
                 # (batch row, KV head) units in passes of <= 1 GiB of them: issue #31).
                 "one-pass": dict(block_major=True, block_pass_bytes=2 ** 50)},
    "teacher": {"bq32": dict(block_q=32), "bq128": dict(block_q=128), "w8": dict(num_warps=8),
                "stages3": dict(num_stages=3)},
    "decode": {"compressed 4 warps": dict(COMPRESSED=dict(num_warps=4, num_stages=2)),
               "splits <= 16": dict(MAX_SPLITS=16),
               "scores 8 warps": dict(SCORES=dict(num_warps=8, num_stages=1)),
               "combine 16 columns": dict(DV_CHUNK=16)},
}
# max |diff| / max |ref|: float32 differs in summation order (TF32 dots in the selected
# kernels); bf16 rounds q, k, v, p and the outputs to 8 bits of mantissa.
TOLERANCE = {"window": {"float32": 1e-4, "bfloat16": 1e-2},
             "compressed": {"float32": 1e-4, "bfloat16": 1e-2},
             "selected": {"float32": 1e-3, "bfloat16": 2e-2},
             "decode": {"float32": 1e-4, "bfloat16": 2e-2},
             # the lse of a block: float32 sums of exact bf16 products or 3-pass TF32 ones
             "teacher": {"float32": 1e-5, "bfloat16": 1e-5}}
# teacher: its query rows are every TEACHER_STRIDE-th position (select_distill_stride's share).
TEACHER_STRIDE = 8
# select: differing rows at most this share, each at a reference-score gap at most MAX_GAP.
MAX_DIFFERING_ROWS, MAX_GAP = 0.01, {"bfloat16": 1e-4, "float32": 1e-2}


@dataclasses.dataclass(frozen=True)
class Shape:
  B: int
  HKV: int
  G: int
  Dk: int
  Dv: int


def inputs(op: str, key, T: int, shape: Shape, config: NSAConfig, dtype):
  """(args, cotangents) of one op's call on random normal inputs."""
  ks = jax.random.split(key, 6)
  normal = lambda k, *s: jax.random.normal(k, s, jnp.float32).astype(dtype)
  B, HKV, HQ = shape.B, shape.HKV, shape.HKV * shape.G
  q = normal(ks[0], B, T, HQ, shape.Dk)
  S = config.num_compressed(T) if op in ("compressed", "select") else T
  k, v = normal(ks[1], B, S, HKV, shape.Dk), normal(ks[2], B, S, HKV, shape.Dv)
  do = normal(ks[3], B, T, HQ, shape.Dv)
  if op == "select":
    lse = jax.jit(lambda q, k: compressed_attention(q, k, k, config=config, impl="xla")[1])
    return (q, k, lse(q, k)), ()
  if op == "teacher":
    rows = jnp.arange(0, T, TEACHER_STRIDE, dtype=jnp.int32)
    return (q[:, rows], k, rows), ()
  if op == "compressed":
    return (q, k, v), (do, jax.random.normal(ks[4], (B, T, HQ), jnp.float32))
  if op == "selected":
    k_cmp = normal(ks[5], B, config.num_compressed(T), HKV, shape.Dk)
    block_idx = jax.jit(lambda q, c: select_blocks(q, c, config=config, impl="xla"))(q, k_cmp)
    return (q, k, v, block_idx), (do,)
  return (q, k, v), (do,)


def kernel_fn(op: str, config: NSAConfig, interpret: bool, change: dict, args) -> Callable:
  """The op's kernel with its default tiles (for these inputs) changed by `change`;
  returns a tuple of outputs."""
  q, k, v = args[:3]
  scale = q.shape[-1] ** -0.5
  if op == "window":
    tiles = dataclasses.replace(win_kernel.default_tiles(q, k, v), **change)
    return lambda q, k, v: (win_kernel.window_attention(
        q, k, v, window=config.window, scale=scale, interpret=interpret, tiles=tiles),)
  if op == "compressed":
    tiles = dataclasses.replace(cmp_kernel.default_tiles(q, k, v), **change)
    return lambda q, k, v: cmp_kernel.compressed_attention(
        q, k, v, block=config.compress_block, stride=config.compress_stride, scale=scale,
        interpret=interpret, tiles=tiles)
  if op == "teacher":
    tiles = dataclasses.replace(teacher_kernel.default_tiles(q, config.select_block), **change)
    return lambda q, k, rows: (teacher_kernel.block_lse(
        q, k, rows, block=config.select_block, scale=scale, interpret=interpret, tiles=tiles),)
  if op == "select":
    sizes = _common.selection_sizes(config)
    tiles = dataclasses.replace(select_kernel.default_tiles(q, sizes, True), **change)
    return lambda q, k, lse: (select_kernel.select_blocks(
        q, k, sizes=sizes, scale=scale, interpret=interpret, tiles=tiles, lse=lse),)
  tiles = dataclasses.replace(selected_attention.default_tiles(q, v), **change)
  return lambda q, k, v, b: (selected_attention.selected_attention(
      q, k, v, b, block=config.select_block, scale=scale, interpret=interpret, tiles=tiles),)


def reference_fn(op: str, config: NSAConfig, args) -> Callable:
  scale = args[0].shape[-1] ** -0.5
  ref = {"window": lambda q, k, v: (window_attention_xla(q, k, v, config=config, scale=scale),),
         "compressed": lambda q, k, v: compressed_attention_xla(q, k, v, config=config,
                                                                 scale=scale),
         "select": lambda q, k, lse: (select_blocks_xla(q, k, config=config, scale=scale),),
         "selected": lambda q, k, v, b: (selected_attention_xla(q, k, v, b, config=config,
                                                                scale=scale),),
         "teacher": lambda q, k, rows: (block_lse_xla(
             q, rows, k, scale, config.select_block, config.num_select_blocks(k.shape[1])),)}[op]
  def f(*a):
    with jax.default_matmul_precision("highest"):
      return ref(*a)
  return f


def with_grads(fn, num_diff: int):
  """jit of (outputs..., gradients of the first num_diff args) for cotangents cts."""
  def run(*args):
    *args, cts = args
    out, vjp = jax.vjp(lambda *d: fn(*d, *args[num_diff:]), *args[:num_diff])
    return (*out, *vjp(cts))
  return jax.jit(run)


def relative_errors(names, got, want) -> dict[str, float]:
  """max |diff| / max |ref| per output; -inf where the reference has -inf (lse of rows
  that see nothing) must match; inf for a non-finite value."""
  errors = {}
  for name, g, w in zip(names, got, want):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    if not np.array_equal(np.isneginf(g), np.isneginf(w)):
      errors[name] = float("inf")
      continue
    g, w = np.where(np.isneginf(w), 0, g), np.where(np.isneginf(w), 0, w)
    errors[name] = (float(np.abs(g - w).max(initial=0) / max(np.abs(w).max(initial=0), 1e-30))
                    if np.isfinite(g).all() else float("inf"))
  return errors


def selection_errors(got, args, config: NSAConfig) -> dict[str, float]:
  """Share of (query, group) rows whose sets differ from the reference's, and the
  largest reference-score gap (relative) between blocks only one side chose, over
  up to 256 differing rows (float32 scores at "highest" precision)."""
  q, k_cmp, _ = args
  scale = q.shape[-1] ** -0.5
  want = np.sort(np.asarray(select_blocks_xla(q, k_cmp, config=config, scale=scale)), -1)
  got = np.sort(np.asarray(got), -1)
  differ = np.argwhere((got != want).any(-1))[:256]
  gaps = []
  for b, t, g in differ:
    qg = q[b, t].reshape(k_cmp.shape[2], -1, q.shape[-1])[g].astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
      s, mask = compressed_scores(qg[None, None], t, k_cmp[b:b + 1, :, g:g + 1]
                                  .astype(jnp.float32), config, scale)
    p, _ = _common.masked_softmax(s, mask)
    scores = np.asarray(group_block_scores(p, config,
                                           config.num_select_blocks(q.shape[1])))[0, 0, 0]
    mine, ref = set(got[b, t, g]) - {-1}, set(want[b, t, g]) - {-1}
    hi, lo = scores[sorted(ref - mine)].max(initial=-np.inf), scores[sorted(mine - ref)].min(
        initial=np.inf)
    gaps.append(float((hi - lo) / abs(hi)) if np.isfinite([hi, lo]).all() else np.inf)
  return {"differing_rows": float((got != want).any(-1).mean()), "max_gap": max(gaps, default=0.0)}


def check(op: str, T: int, dtype, shape: Shape, config, interpret, key, change=None) -> dict:
  args, cts = inputs(op, key, T, shape, config, dtype)
  fn = kernel_fn(op, config, interpret, change or {}, args)
  name = jnp.dtype(dtype).name
  if op == "select":
    errors = selection_errors(jax.jit(fn)(*args)[0], args, config)
    ok = errors["differing_rows"] <= MAX_DIFFERING_ROWS and errors["max_gap"] <= MAX_GAP[name]
  elif op == "teacher":   # no gradient
    f32 = args[0].astype(jnp.float32), args[1].astype(jnp.float32), args[2]
    errors = relative_errors(("lse",), jax.jit(fn)(*args),
                             jax.jit(reference_fn(op, config, args))(*f32))
    ok = errors["lse"] <= TOLERANCE[op][name]
  else:
    f32 = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
    got = with_grads(fn, 3)(*args, cts)
    want = with_grads(reference_fn(op, config, args), 3)(*map(f32, args), tuple(map(f32, cts)))
    names = ("o", "lse")[:len(got) - 3] + ("dq", "dk", "dv")
    errors = relative_errors(names, got, want)
    ok = max(errors.values()) <= TOLERANCE[op][name]
  return {"T": T, "dtype": name, "variant": change, "errors": errors, "ok": bool(ok)}


def time_op(op: str, T: int, shape, config, interpret, runs, key, change=None) -> dict:
  args, cts = inputs(op, key, T, shape, config, jnp.bfloat16)
  fn = kernel_fn(op, config, interpret, change or {}, args)
  row = {"T": T, "fwd_ms": bc.median_ms(jax.jit(fn), *args, runs=runs)}
  if op not in ("select", "teacher"):
    row["fwd_bwd_ms"] = bc.median_ms(with_grads(fn, 3), *args, cts, runs=runs)
  if op == "window" and not interpret:   # the yardstick nsa runs for 16-bit windows
    cudnn = lambda q, k, v: window_attention(q, k, v, config=config, impl="cudnn")
    row["cudnn_fwd_ms"] = bc.median_ms(jax.jit(cudnn), *args, runs=runs)
  return row


def decode_rows(ts, batches, variants, small, reps, config: NSAConfig) -> list[dict]:
  """Each decode variant: its step checked against the XLA step, then timed as
  bench_decode.py does (Config A, full caches of T tokens)."""
  from experiments.bench_decode import STEPS, check_kernel, steps_loop, timed
  HQ, HKV, D, dtype = (16, 1, 16, jnp.float32) if small else (64, 4, 128, jnp.bfloat16)
  defaults = {k: getattr(decode_attention, k) for v in VARIANTS["decode"].values() for k in v}
  rows = []
  for T, B in ((T, B) for T in ts for B in batches):
    S, Sc = decoding.cache_rows(config, T)
    ks = jax.random.split(jax.random.key(T + B), 8)
    rnd = lambda k, s: jax.random.normal(k, s, dtype)
    operands = (rnd(ks[0], (B, HQ, D)), *(rnd(k, (B, Sc, HKV, D)) for k in ks[1:3]),
                *(rnd(k, (B, S, HKV, D)) for k in ks[3:7]),
                jax.nn.sigmoid(rnd(ks[7], (B, HQ, 3))), jnp.full((B,), T, jnp.int32))
    for name in variants:
      for k, v in {**defaults, **VARIANTS["decode"].get(name, {})}.items():
        setattr(decode_attention, k, v)
      try:
        row = dict(T=T, B=B, variant=name, **check_kernel(config, *operands))
        row["ok"] = row["o_rel_err"] <= TOLERANCE["decode"][jnp.dtype(dtype).name] and (
            row["selection_agreement"] == 1.0)
        loop = steps_loop(lambda q, *c: decode.nsa_decode(q, *c, config=config, impl="pallas"))
        row["us_per_step"] = timed(loop, *operands, reps=reps) * 1e6
        if name == "default" and not small:
          row["breakdown_us"] = [(n.split(": ")[-1], us / STEPS)
                                 for n, us, _ in bc.device_op_times(loop, *operands)[:6]]
      finally:
        for k, v in defaults.items():
          setattr(decode_attention, k, v)
      rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("op", choices=sorted(VARIANTS))
  parser.add_argument("--small", action="store_true", help="tiny shapes, interpret mode (CPU)")
  parser.add_argument("--config-b", action="store_true", help="Dk = 192, Dv = 128")
  parser.add_argument("--heads", default=None, help="Dk,Dv (default: Config A's or B's)")
  parser.add_argument("--group", type=int, default=16,
                      help="G query heads per KV head (HKV = HQ / G; default 16)")
  parser.add_argument("--q-heads", type=int, default=64,
                      help="HQ query heads (default 64, Config A; the research preset: 16)")
  parser.add_argument("--batch", type=int, default=1, help="B sequences (default 1)")
  parser.add_argument("--group-score", choices=("sum", "max"), default="sum",
                      help="NSAConfig.group_score (select, decode; default: the paper's sum)")
  parser.add_argument("--ts", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
  parser.add_argument("--check-ts", type=int, nargs="+", default=[8192, 16384])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="decode only")
  parser.add_argument("--skip-check", action="store_true")
  parser.add_argument("--variants", default=None, help="comma-separated names (default: all)")
  parser.add_argument("--no-variants", action="store_true")
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--out", default=None, help="default: $OUT, else experiments/results")
  args = parser.parse_args()
  op, small = args.op, args.small
  names = ([] if args.no_variants else args.variants.split(",") if args.variants
           else list(VARIANTS[op]))
  config = dataclasses.replace(bc.small_config() if small else NSAConfig(),
                               group_score=args.group_score)
  shape = (Shape(1, 1, 16, 24 if args.config_b else 16, 16) if small
           else Shape(1, 4, 16, 192 if args.config_b else 128, 128))
  if args.heads:
    Dk, Dv = (int(x) for x in args.heads.split(","))
    shape = dataclasses.replace(shape, Dk=Dk, Dv=Dv)
  if not small:
    if args.q_heads % args.group:
      parser.error(f"--q-heads={args.q_heads} must be a multiple of --group={args.group}")
    shape = dataclasses.replace(shape, B=args.batch, HKV=args.q_heads // args.group,
                                G=args.group)
  check_ts, ts = ([45 if op != "select" else 300], [64 if op != "select" else 512]) if small \
      else (args.check_ts, sorted(args.ts))
  interpret, runs = small, (2 if small else max(args.runs, 10))
  result = {"op": op, "shape": dataclasses.asdict(shape), "checks": [], "timings": [],
            "variants": []}
  print(f"device: {bc.gpu_name()}, jax {jax.__version__}, {op}, {shape}", flush=True)
  key = jax.random.key(0)

  if op == "decode":
    rows = decode_rows([1024] if small else ts[-1:], [1] if small else args.batches,
                       ["default"] + names, small, 1 if small else runs,
                       dataclasses.replace(NSAConfig(), group_score=args.group_score))
    result["timings"] = rows
    bc.print_table(["T", "B", "variant", "us/step", "o error", "selections agree", "ok"],
                   [[r["T"], r["B"], r["variant"], r["us_per_step"], r["o_rel_err"],
                     r["selection_agreement"], r["ok"]] for r in rows])
    failed = [r for r in rows if not r["ok"]]
  else:
    for T in [] if args.skip_check else check_ts:
      for dtype in (jnp.float32, jnp.bfloat16):
        result["checks"].append(check(op, T, dtype, shape, config, interpret, key))
    for T in ts:
      result["timings"].append(time_op(op, T, shape, config, interpret, runs, key))
    for name in names:
      row = {"variant": name, "tiles_change": VARIANTS[op][name]}
      try:
        row.update(time_op(op, ts[-1], shape, config, interpret, runs, key, VARIANTS[op][name]))
        if not args.skip_check:
          c = check(op, check_ts[-1], jnp.bfloat16, shape, config, interpret, key,
                    VARIANTS[op][name])
          row.update(check_T=c["T"], errors=c["errors"], ok=c["ok"])
      except Exception as err:   # a variant Triton cannot compile: recorded, the run goes on
        row["error"] = bc.describe_error(err)
      result["variants"].append(row)
    failed = [c for c in result["checks"] if not c["ok"]]
    print("\nchecks (max |diff| / max |ref|; select: rows differing, score gap)")
    bc.print_table(["T", "dtype", "errors", "ok"],
                   [[c["T"], c["dtype"], " ".join(f"{k} {v:.1e}" for k, v in c["errors"].items()),
                     c["ok"]] for c in result["checks"]])
    print("\ntimings, bf16 (ms)")
    bc.print_table(["T", "variant", "fwd", "fwd+bwd", "cuDNN fwd", "bf16 check"],
                   [[r["T"], "default", r["fwd_ms"], r.get("fwd_bwd_ms"), r.get("cudnn_fwd_ms"),
                     "-"] for r in result["timings"]]
                   + [[ts[-1], r["variant"], r.get("fwd_ms"), r.get("fwd_bwd_ms"), None,
                       r.get("error") or r.get("ok")] for r in result["variants"]])
  out = args.out or bc.default_out_dir()
  bc.write_json(os.path.join(out, f"profile_{op}.json"), result, config)
  print("all checks passed" if not failed else f"FAILED: {len(failed)} check(s)")
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
