"""The Pallas kernels' shared memory: each kernel's estimate next to Triton's own
allocation, for an H100 / H200 (sm90), without a GPU (docs/kernels.md#shared-memory).

    python -m experiments.shared_memory                          # estimates only
    python -m experiments.shared_memory --triton-python PYTHON   # and Triton's numbers

PYTHON is an interpreter with the `triton` wheel from PyPI. Writes shared_memory.json to
--out (default $OUT, else a new temporary directory: the committed table is
results/history/shared_memory_sm90.json) and prints the rows over the budget or
under-estimated.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from experiments import bench_common as bc
from nsa_jax import NSAConfig
from nsa_jax.ops._common import selection_sizes
from pallas_kernels import (_flash_tiles, _util, block_lse, compressed_attention, decode_attention,
                            select_blocks, selected_attention, window_attention)
from pallas_kernels.selected_attention import choice as selected_choice
from pallas_kernels.selected_attention import tiles as selected_tiles

HEADS = [(32, 32), (64, 64), (96, 96), (128, 128), (192, 128), (256, 256)]
GROUPS = [1, 2, 4, 8, 16]
DTYPES = ["bfloat16", "float32"]
# Compiles a Triton IR file for sm90 up to LLVM IR and prints the shared memory.
COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
import triton._C.libtriton as lt
target = GPUTarget("cuda", 90, 32)
backend = triton.compiler.make_backend(target)
options = backend.parse_options(dict(num_warps=int(sys.argv[2]), num_stages=int(sys.argv[3])))
ctx = lt.ir.context(); lt.ir.load_dialects(ctx); backend.load_dialects(ctx)
stages, metadata = {}, {}
backend.add_stages(stages, options, triton.compiler.compiler.Language.TRITON)
module = lt.ir.parse_mlir_module(sys.argv[1], ctx)
module.context = ctx
for name in ("ttir", "ttgir", "llir"):
  module = stages[name](module, metadata)
print(metadata["shared"])
"""


def lowered_kernels(fn, *args):
  """[(name, num_warps, num_stages, Triton IR text)] of every pallas_call in fn(*args),
  lowered for an H200 (jax's Pallas Triton lowering, no GPU needed)."""
  from jax._src.pallas import core as pallas_core
  from jax._src.pallas.triton import core as triton_core
  from jax._src.pallas.triton import gpu_info, lowering, pallas_call_registration as reg

  found = []
  lower, rule = lowering.lower_jaxpr_to_triton_module, reg.pallas_call_lowering

  def capture(*a, **kw):
    result = lower(*a, **kw)
    found.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  def call_rule(ctx, *a, compiler_params=None, **kw):
    out = rule(ctx, *a, compiler_params=compiler_params, **kw)
    found[-1] = (kw.get("name") or "?", compiler_params.num_warps,
                 compiler_params.num_stages, found[-1])
    return out

  saved = reg.lowering.lower_jaxpr_to_triton_module, reg.gpu_info_lib.get_gpu_info
  reg.lowering.lower_jaxpr_to_triton_module = capture
  reg.gpu_info_lib.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(
      gpu_info.GpuVersion.H200)
  pallas_core.register_lowering_rule(triton_core.CompilerParams, call_rule, "gpu")
  try:
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    reg.lowering.lower_jaxpr_to_triton_module, reg.gpu_info_lib.get_gpu_info = saved
    pallas_core.register_lowering_rule(triton_core.CompilerParams, rule, "gpu")
  return found


def triton_shared(python: str, ir: str, num_warps: int, num_stages: int, cache: dict) -> int:
  key = hashlib.sha1(f"{ir}{num_warps}{num_stages}".encode()).hexdigest()
  if key not in cache:
    with tempfile.NamedTemporaryFile("w", suffix=".ttir", delete=False) as f:
      f.write(ir)
    try:
      proc = subprocess.run([python, "-c", COMPILE, f.name, str(num_warps), str(num_stages)],
                            capture_output=True, text=True, check=True)
      cache[key] = int(proc.stdout.split()[-1])
    finally:
      os.unlink(f.name)
  return cache[key]


def fwd_bwd(f, num_diff):
  def run(*args):
    out, vjp = jax.vjp(lambda *d: f(*d, *args[num_diff:]), *args[:num_diff])
    return vjp(jax.tree.map(jnp.ones_like, out))
  return run


def cases(Dk, Dv, G, dtype, config):
  """[(op, [(kernel name, estimate with fitted tiles, estimate before fitting)],
  fn, args)] of one shape: the estimates in the order the lowering meets the kernels."""
  isz, T, HKV = jnp.dtype(dtype).itemsize, 2048, 2
  x = lambda *s, d=dtype: jax.ShapeDtypeStruct(s, jnp.dtype(d))
  q, k, v = x(1, T, HKV * G, Dk), x(1, T, HKV, Dk), x(1, T, HKV, Dv)
  Tc = config.num_compressed(T)
  kc, vc = x(1, Tc, HKV, Dk), x(1, Tc, HKV, Dv)
  sizes = selection_sizes(config)
  out = []
  for op, kernel, before, args in [
      ("window", window_attention, window_attention.TILES, (q, k, v)),
      ("compressed", compressed_attention, compressed_attention.TILES, (q, kc, vc))]:
    before = before.for_float32() if isz == 4 else before
    if op == "compressed" and Dk > 128:
      before = dataclasses.replace(before, bwd_block_m=compressed_attention.WIDE_HEAD_BWD_BLOCK_M)
    fitted = kernel.default_tiles(*args)
    now, old = (_flash_tiles.shared_memory(t, G, Dk, Dv, isz) for t in (fitted, before))
    fn = (lambda *a: window_attention.window_attention(*a, window=config.window, scale=0.1,
                                                       interpret=False)) if op == "window" else (
        lambda *a: compressed_attention.compressed_attention(
            *a, block=config.compress_block, stride=config.compress_stride, scale=0.1,
            interpret=False))
    out.append((op, [(n, now[n], old[n]) for n in ("fwd", "dq", "dkv")], fwd_bwd(fn, 3), args))
  for lse in (False, True):
    tiles = select_blocks.default_tiles(q, sizes, lse)
    before = select_blocks.WITH_LSE if lse else select_blocks.Tiles()
    est = [("select", *(select_blocks.shared_memory(t, sizes, Dk, isz) for t in (tiles, before)))]
    extra = (x(1, T, HKV * G, d="float32"),) if lse else ()
    out.append(("select" + " lse" * lse, est, lambda q, k, *l: select_blocks.select_blocks(
        q, k, sizes=sizes, scale=0.1, interpret=False, lse=l[0] if l else None), (q, kc) + extra))
  tiles = block_lse.default_tiles(q, config.select_block)
  est = [("block_lse", *(block_lse.shared_memory(t, config.select_block, Dk, isz)
                         for t in (tiles, block_lse.Tiles())))]
  out.append(("block lse", est, lambda q, k, p: block_lse.block_lse(
      q, k, p, block=config.select_block, scale=0.1, interpret=False), (q, k, x(T, d="int32"))))
  # Selected attention: each tiling forced in turn (query tiles, block-major where its
  # tiles fit), its forward's kernels, then its backward's.
  block_idx = x(1, T, HKV, config.num_selected, d="int32")
  before = selected_tiles.default_tiles(q, v)
  for name, block_major, phases in (
      ("query tiles", False, (("fwd",), ("dq", "dkv"))),
      ("block-major", True, (("block_fwd",), ("block_dkv",)))):
    forced = dataclasses.replace(before, block_major=block_major)
    kernels = selected_choice.BLOCK_MAJOR if block_major else selected_choice.QUERY_TILES
    fitted = selected_choice.fit_tiles_for(q, v, config.select_block, forced, kernels)
    if fitted is None:
      continue
    now_e, old_e = (selected_tiles.shared_memory(tiles, G, Dk, Dv, config.select_block, isz)
                    for tiles in (fitted, forced))
    est = [(f"{n} {name}", now_e[n], old_e[n]) for phase in phases for n in phase]
    out.append(("selected", est, fwd_bwd(
        lambda q, k, v, b, tiles=forced: selected_attention.selected_attention(
            q, k, v, b, block=config.select_block, scale=0.1, interpret=False, tiles=tiles), 3),
        (q, k, v, block_idx)))
  if _util.is_pow2(Dk) and _util.is_pow2(Dv):
    S, Sc = 2048, 128
    d = decode_attention.shared_memory(G, Dk, Dv, decode_attention.BLOCK_K, isz)
    names = ("compressed", "scores", "top_n", "local", "combine")
    out.append(("decode", [(n, d, d) for n in names], lambda *a: decode_attention.nsa_decode(
        *a, sizes=sizes, window=config.window, scale=0.1, interpret=False),
        (x(1, HKV * G, Dk), x(1, Sc, HKV, Dk), x(1, Sc, HKV, Dv), x(1, S, HKV, Dk),
         x(1, S, HKV, Dv), x(1, S, HKV, Dk), x(1, S, HKV, Dv), x(1, HKV * G, 3),
         x(1, d="int32"))))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--triton-python", default=None,
                      help="python with the `triton` wheel (omit: estimates only)")
  parser.add_argument("--cache", default=None,
                      help="JSON file of Triton's numbers by IR, read and extended (reruns)")
  parser.add_argument("--small", action="store_true", help="two shapes (smoke test)")
  parser.add_argument("--out", default=None,
                      help="default: $OUT, else a new temporary directory")
  args = parser.parse_args(argv)
  config, budget = NSAConfig(), _util.HOPPER_SHARED_MEMORY
  shapes = (list(itertools.product([(128, 128), (192, 128)], [4], ["bfloat16"])) if args.small
            else list(itertools.product(HEADS, GROUPS, DTYPES)))
  rows = []
  cache = json.load(open(args.cache)) if args.cache and os.path.exists(args.cache) else {}
  for (Dk, Dv), G, dtype in shapes:
    for op, estimates, fn, fn_args in cases(Dk, Dv, G, dtype, config):
      kernels = lowered_kernels(fn, *fn_args) if args.triton_python else [None] * len(estimates)
      for (name, now, before), kernel in zip(estimates, kernels):
        row = dict(op=op, kernel=name, Dk=Dk, Dv=Dv, G=G, dtype=dtype, estimate=now,
                   estimate_before=before, budget=budget)
        if kernel is not None:
          triton_name, warps, stages, ir = kernel
          row.update(triton_kernel=triton_name, num_warps=warps, num_stages=stages,
                     triton=triton_shared(args.triton_python, ir, warps, stages, cache))
          row["under_estimated"] = row["triton"] > now
          if args.cache:
            with open(args.cache, "w") as f:
              json.dump(cache, f)
        rows.append(row)
        flags = [f for f, bad in (("over budget before", before > budget),
                                  ("OVER BUDGET", now > budget),
                                  ("UNDER-ESTIMATED", row.get("under_estimated"))) if bad]
        if flags:
          print(f"{op:10s} {name:18s} Dk={Dk:3d} Dv={Dv:3d} G={G:2d} {dtype:8s} estimate "
                f"{now:7d} (before fitting {before:7d}) triton {row.get('triton', '-')}: "
                + ", ".join(flags), flush=True)
  out = args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="shared_memory_")
  bc.write_json(os.path.join(out, "shared_memory.json"), {
      "budget": budget, "triton_python": args.triton_python, "rows": rows}, config)
  print(f"{len(rows)} kernels; over the budget before fitting: "
        f"{sum(r['estimate_before'] > budget for r in rows)}, after: "
        f"{sum(r['estimate'] > budget for r in rows)}; under-estimated: "
        f"{sum(bool(r.get('under_estimated')) for r in rows)}")
  sys.exit(1 if any(r["estimate"] > budget or r.get("under_estimated") for r in rows) else 0)


if __name__ == "__main__":
  main()
