"""Launch-parameter sweep of the decode kernels (pallas_kernels/decode_attention.py).

    PYTHONPATH=.:experiments python experiments/check_decode.py          # on a GPU
    PYTHONPATH=.:experiments python experiments/check_decode.py --small  # CPU, interpret mode

For each variant of the module's constants (`VARIANTS`: warps and stages per
kernel, splits, tensor sizes), times one decode step as `bench_decode.py` does
(Config A, bf16, full caches of T tokens; STEPS dependent steps in one jit,
median of --reps runs) at each (T, B), splits the default's device time by
kernel (profiler), and checks every variant's output and selection against
the XLA step. Prints a table; writes $OUT/check_decode.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from bench_common import default_out_dir, device_op_times
from bench_decode import STEPS, check_kernel, steps_loop, timed
from nsa_jax import NSAConfig, decoding
from pallas_kernels import decode_attention as kernel

VARIANTS = {
    "default": {},
    "compressed 4 warps": dict(COMPRESSED=dict(num_warps=4, num_stages=2)),
    "compressed 2 warps 3 stages": dict(COMPRESSED=dict(num_warps=2, num_stages=3)),
    "splits <= 16": dict(MAX_SPLITS=16),
    "scores 8 warps": dict(SCORES=dict(num_warps=8, num_stages=1)),
    "combine 4 warps 4k tensors": dict(COMBINE=dict(num_warps=4, num_stages=1),
                                       COMBINE_ELEMENTS=4096),
    "combine 16 columns": dict(DV_CHUNK=16),
}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--contexts", default="65536")
  ap.add_argument("--batches", default="1,32")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--small", action="store_true", help="CPU smoke test: tiny shapes")
  ap.add_argument("--out", default=None, help="default: $OUT, else experiments/results")
  args = ap.parse_args()
  config = NSAConfig()
  if args.small:
    contexts, batches, (HQ, HKV, D, dtype), args.reps = [1024], [1], (16, 1, 16, jnp.float32), 1
  else:
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    HQ, HKV, D, dtype = 64, 4, 128, jnp.bfloat16
  names = args.variants.split(",")
  defaults = {k: getattr(kernel, k) for v in VARIANTS.values() for k in v}
  print(f"device: {jax.devices()[0].device_kind}")
  rows = []
  for T in contexts:
    S, Sc = decoding.cache_rows(config, T)
    for B in batches:
      ks = jax.random.split(jax.random.key(T + B), 8)
      rnd = lambda k, shape: jax.random.normal(k, shape, dtype)
      operands = (rnd(ks[0], (B, HQ, D)), rnd(ks[1], (B, Sc, HKV, D)),
                  rnd(ks[2], (B, Sc, HKV, D)), rnd(ks[3], (B, S, HKV, D)),
                  rnd(ks[4], (B, S, HKV, D)), rnd(ks[5], (B, S, HKV, D)),
                  rnd(ks[6], (B, S, HKV, D)), jax.nn.sigmoid(rnd(ks[7], (B, HQ, 3))),
                  jnp.full((B,), T, jnp.int32))
      for name in names:
        for k, v in {**defaults, **VARIANTS[name]}.items():
          setattr(kernel, k, v)
        row = dict(T=T, B=B, variant=name, **check_kernel(config, *operands))
        loop = steps_loop(lambda q, *c: decoding.nsa_decode(q, *c, config=config, impl="pallas"))
        row["us"] = timed(loop, *operands, reps=args.reps) * 1e6
        if name == "default":
          row["breakdown"] = [(op.split(": ")[-1], us / STEPS)
                              for op, us, _ in device_op_times(loop, *operands)[:6]]
        print(f"T={T:>6} B={B:>2} {name:>28}: {row['us']:7.1f} us/step  error "
              f"{row['o_rel_err']:.1e}  selections agree {100 * row['selection_agreement']:.0f} %",
              flush=True)
        for op, us in row.get("breakdown", []):
          print(f"{'':>40}{us:7.1f} us  {op}")
        rows.append(row)
      for k, v in defaults.items():
        setattr(kernel, k, v)
  out = args.out or default_out_dir()
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "check_decode.json"), "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
