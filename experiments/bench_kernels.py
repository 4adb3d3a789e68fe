"""Benchmark of the NSA ops against cuDNN dense attention (docs/benchmarks.md#op-level).

One process, one GPU: the whole `nsa` op and each branch alone, forward and forward+backward,
against cuDNN's causal attention (and fla's `parallel_nsa` where it imports), with a FLOP
floor over a matmul rate measured in the same run (docs/benchmarks.md#flop-budget). Configs
A and B, the G sweep, packed rows (issue #20) and the research shapes (issue #19).

Run on the device machine (about 6 minutes on an H100):
    python3 experiments/bench_kernels.py            # T = 8k..64k, 128k if time is left
    python3 experiments/bench_kernels.py --quick    # T = 8k, 64k
    python3 experiments/bench_kernels.py --packed   # Config A 8k, 64k: nsa with / without
                                                    # segment ids, and cuDNN (~2 minutes)
    python3 experiments/bench_kernels.py --research [--quick]   # research_kernels_<gpu>.json
    python3 experiments/bench_kernels.py --small    # tiny shapes, CPU, for the smoke test
"""
from __future__ import annotations

import importlib.util
import os

# Before jax starts: where the torch peer is installed, let it share the GPU.
# Otherwise jax keeps its preallocated pool: grown on demand instead, it
# failed to find one 44 GiB block for the G = 1 fwd+bwd at 64k (fragmented
# by the runs before it) although the program fits (60 GB peak alone);
# experiments/results/history/bench_rerun_g1_g2_v8_nvidia-h200.json.
if importlib.util.find_spec("fla") is not None:
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import bench_common as bc   # also puts the repo root on sys.path
from nsa_jax import (NSAConfig, compressed_attention, nsa, select_blocks,
                     selected_attention, window_attention)
from nsa_jax.ops.nsa import backends as nsa_backends

Shape = bc.Shape   # config "A", "B" or "G<g>" (G sweep); bf16
DOCUMENT_TOKENS = 4096     # packed rows: documents of this many tokens (issue #20)
PACKED_TS = (8192, 65536)  # Config A's lengths that also time packed rows
PACKED_SMALL = (64, (200,))  # --small: documents of 64 tokens at T = 200


# ----------------------------------------------------------------------------
# FLOP counts. A (query, key) pair of one head costs 2*Dk (q.k) + 2*Dv (p*v)
# FLOP forward. Backward, flash style: recompute q.k (2*Dk), dP = dO v (2*Dv),
# dV = P^T dO (2*Dv), dQ = dS k (2*Dk), dK = dS^T q (2*Dk). The top-n scoring
# is q.k only (2*Dk) and has no backward; in the fused floor of `nsa` it is
# counted once with the compressed branch (one pass can do both: docs/benchmarks.md#flop-budget).
# ----------------------------------------------------------------------------
def visible_pairs(T: int, config: NSAConfig) -> dict[str, int]:
  """Sum over queries t = 0..T-1 of the keys each branch attends to (one head)."""
  t = np.arange(T, dtype=np.int64)
  l, d, lp = config.compress_block, config.compress_stride, config.select_block
  # compressed: blocks i with i*d + l - 1 <= t, at most Tc of them
  cmp = np.clip((t - l + 1) // d + 1, 0, config.num_compressed(T))
  # selected: min(n, #candidates) blocks; the block holding t is always selected
  # (num_local >= 1) and shows t % l' + 1 keys, the others all l' keys.
  # With num_local = 0 this is an upper bound.
  num_sel = np.minimum(config.num_selected, t // lp + 1)
  slc = (t % lp + 1) + lp * (num_sel - 1)
  win = np.minimum(config.window, t + 1)
  return {"compressed": int(cmp.sum()), "selected": int(slc.sum()),
          "window": int(win.sum()), "dense": T * (T + 1) // 2}


def document_lengths(T: int, document: int) -> list[int]:
  """Packed rows of T tokens: documents of `document` tokens, the last what is left."""
  return [min(document, T - start) for start in range(0, T, document)]


def flop_counts(shape: Shape, config: NSAConfig,
                document: int = DOCUMENT_TOKENS) -> dict[tuple[str, str], int]:
  """FLOPs of every timed (op, pass), pass in {"fwd", "fwd+bwd"}; "nsa_packed":
  the whole op on rows of documents of `document` tokens, each document's pairs."""
  out = _flop_counts(shape, config, [shape.T])
  packed = _flop_counts(shape, config, document_lengths(shape.T, document))
  out.update({("nsa_packed", p): packed[("nsa", p)] for p in ("fwd", "fwd+bwd")})
  return out


def _flop_counts(shape: Shape, config: NSAConfig, lengths) -> dict[tuple[str, str], int]:
  """`flop_counts` of rows holding documents of `lengths` tokens."""
  counts = [visible_pairs(T, config) for T in lengths]
  pairs = {key: sum(c[key] for c in counts) for key in counts[0]}
  heads = shape.B * shape.HQ
  fwd = 2 * (shape.Dk + shape.Dv)
  bwd = 2 * (3 * shape.Dk + 2 * shape.Dv)
  out = {("select_blocks", "fwd"): heads * 2 * shape.Dk * pairs["compressed"]}
  for op, key in [("compressed_attention", "compressed"), ("selected_attention", "selected"),
                  ("window_attention", "window"), ("dense", "dense")]:
    out[(op, "fwd")] = heads * fwd * pairs[key]
    out[(op, "fwd+bwd")] = heads * (fwd + bwd) * pairs[key]
  for p in ("fwd", "fwd+bwd"):
    out[("nsa", p)] = sum(out[(op, p)] for op in
                          ("compressed_attention", "selected_attention", "window_attention"))
  return out


# ----------------------------------------------------------------------------
# Inputs and the functions timed
# ----------------------------------------------------------------------------
def packed_segment_ids(T: int, document: int):
  """[1, T] int32 segment ids of documents of `document` tokens (packed rows)."""
  lengths = document_lengths(T, document)
  return jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None], jnp.int32)


def nsa_cases(shape: Shape, config: NSAConfig, impls: dict, dtype, branches: bool,
              document: int | None = None):
  """[(op, pass, fn, make_inputs)] for the NSA op and, if asked, its branches and the
  op on packed rows ("nsa_packed": documents of `document` tokens, B rows alike)."""
  # The compressed and window branches alone run as inside nsa: on cuDNN where
  # cuDNN takes them.
  impl = dict(impls, **nsa_cudnn_impls(shape, config, impls["nsa"], dtype))
  kw = lambda op: dict(config=config, impl=impl[op])
  names = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")
  select = jax.jit(lambda q, k: select_blocks(q, k, **kw("select_blocks")))

  def inputs_of(*keys, block_idx=False):
    def make(key):
      x = bc.random_nsa_inputs(shape.B, shape.T, shape.HQ, shape.HKV, shape.Dk, shape.Dv,
                               config, dtype, key)
      args = [x[k] for k in keys]
      if block_idx:   # precomputed selection, the way nsa would select
        args.append(select(x["q"], x["k_cmp"]))
      return tuple(args) + (x["cotangent"],)
    return make

  def drop_cotangent(make):
    return lambda key: make(key)[:-1]

  nsa_fn = lambda *a: nsa(*a, **kw("nsa"))
  cmp_fn = lambda q, k, v: compressed_attention(q, k, v, **kw("compressed_attention"))[0]
  slc_fn = lambda q, k, v, idx: selected_attention(q, k, v, idx, **kw("selected_attention"))
  win_fn = lambda q, k, v: window_attention(q, k, v, **kw("window_attention"))

  cases = [("nsa", nsa_fn, inputs_of(*names), len(names))]
  if document:
    segment_ids = jnp.broadcast_to(packed_segment_ids(shape.T, document), (shape.B, shape.T))
    cases.append(("nsa_packed", lambda *a: nsa(*a, **kw("nsa"), segment_ids=segment_ids),
                  inputs_of(*names), len(names)))
    impl["nsa_packed"] = impl["nsa"]
  if branches:
    cases += [("compressed_attention", cmp_fn, inputs_of("q", "k_cmp", "v_cmp"), 3),
              ("select_blocks", select, inputs_of("q", "k_cmp"), 0),
              ("selected_attention", slc_fn, inputs_of("q", "k_slc", "v_slc", block_idx=True), 3),
              ("window_attention", win_fn, inputs_of("q", "k_win", "v_win"), 3)]
  for op, fn, make, num_diff in cases:
    yield op, impl[op], "fwd", fn, drop_cotangent(make)
    if num_diff:
      yield op, impl[op], "fwd+bwd", bc.forward_backward(fn, num_diff), make


def nsa_cudnn_impls(shape: Shape, config: NSAConfig, impl: str, dtype) -> dict[str, str]:
  """What `nsa(impl=impl)` runs its compressed and window branches on here
  (`nsa_jax.ops.nsa.backends`): {"compressed_attention": backend, "window_attention": backend}."""
  x = lambda H, D, T=shape.T: jax.ShapeDtypeStruct((shape.B, T, H, D), dtype)
  kv = lambda T=shape.T: (x(shape.HKV, shape.Dk, T), x(shape.HKV, shape.Dv, T))
  chosen = nsa_backends(x(shape.HQ, shape.Dk), *kv(config.num_compressed(shape.T)), *kv(), *kv(),
                        config=config, impl=impl)
  return {op: chosen[op] for op in ("compressed_attention", "window_attention")}


def dense_candidates(shape: Shape, impl: str):
  """[(name, f(q, k, v))]: ways to run causal dense attention, preferred first.

  jax.nn.dot_product_attention takes GQA (k/v with HKV heads) but needs
  Dk == Dv; for Dk != Dv (Config B) cuDNN's own MLA path (jax._src, cuDNN >=
  9.10 on Hopper) is tried, then v zero-padded to Dk (which costs cuDNN
  (Dk + Dk)/(Dk + Dv) more P.V work). Repeating k/v heads is the last resort.
  """
  G, Dk, Dv = shape.G, shape.Dk, shape.Dv
  scale = 1.0 / math.sqrt(Dk)

  def nn_dpa(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        implementation=impl)

  def cudnn_mla(q, k, v):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
    return dot_product_attention(q, k, v, scale=scale, mask_type=MaskType.CAUSAL)

  def pad_v(f):
    return lambda q, k, v: f(q, k, jnp.pad(v, [(0, 0)] * 3 + [(0, Dk - Dv)]))[..., :Dv]

  def repeat_kv(f):
    return lambda q, k, v: f(q, jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2))

  if Dk == Dv:
    base = [("gqa", nn_dpa)]
  elif Dk > Dv:
    base = ([("mla", cudnn_mla)] if impl == "cudnn" else []) + [("pad-v", pad_v(nn_dpa))]
  else:
    raise ValueError(f"dense baseline needs Dk >= Dv, got Dk={Dk}, Dv={Dv}")
  return base + [(f"{name}+repeat-kv", repeat_kv(f)) for name, f in base]


def dense_inputs(shape: Shape, dtype, key):
  kq, kk, kv, kc = jax.random.split(key, 4)
  B, T = shape.B, shape.T
  return (jax.random.normal(kq, (B, T, shape.HQ, shape.Dk), dtype),
          jax.random.normal(kk, (B, T, shape.HKV, shape.Dk), dtype),
          jax.random.normal(kv, (B, T, shape.HKV, shape.Dv), dtype),
          jax.random.normal(kc, (B, T, shape.HQ, shape.Dv), dtype))


def time_fla_peer(shape: Shape, config: NSAConfig) -> dict:
  """fla's parallel_nsa (Triton, PyTorch) on the same shapes, or a note why not."""
  try:
    import torch
    import triton.testing
    from fla.ops.nsa import parallel_nsa
  except Exception as err:   # expected where fla is not installed
    return {"skipped": f"fla not importable ({bc.describe_error(err)})"}
  if shape.G < 16 or shape.G & (shape.G - 1):
    return {"skipped": f"fla needs G a power of 2 >= 16, got G={shape.G}"}
  try:
    dev, dt = "cuda", torch.bfloat16
    B, T, HQ, HKV = shape.B, shape.T, shape.HQ, shape.HKV
    leaf = lambda *s: torch.randn(*s, device=dev, dtype=dt).requires_grad_()
    q, k, v = leaf(B, T, HQ, shape.Dk), leaf(B, T, HKV, shape.Dk), leaf(B, T, HKV, shape.Dv)
    g_cmp, g_slc = (torch.rand(B, T, HQ, device=dev, dtype=dt).requires_grad_()
                    for _ in range(2))
    run = lambda: parallel_nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc,
                               block_counts=config.num_selected,
                               block_size=config.select_block, window_size=0)
    do = torch.randn(B, T, HQ, shape.Dv, device=dev, dtype=dt)

    def fwd():
      with torch.no_grad():
        run()

    def bench(fn):
      fn()   # compile / autotune
      torch.cuda.synchronize()
      start = time.perf_counter()
      fn()
      torch.cuda.synchronize()
      once_ms = (time.perf_counter() - start) * 1e3
      return triton.testing.do_bench(fn, warmup=max(25, 2 * once_ms), rep=max(100, 12 * once_ms),
                                     grad_to_none=[q, k, v, g_cmp, g_slc], return_mode="median")
    return {"fwd_ms": bench(fwd), "fwd+bwd_ms": bench(lambda: run().backward(do)),
            "note": "fla parallel_nsa: mean-pooled compression with l = l', no window, "
                    "same inputs every run (do_bench)"}
  except Exception as err:   # recorded, never fatal
    return {"error": bc.describe_error(err)}


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------
class Bench:
  """Collects timing records; skips what is left once the time budget is spent."""

  def __init__(self, args, config, impls, rate_tflops):
    self.args, self.config, self.impls, self.rate = args, config, impls, rate_tflops
    self.deadline = time.perf_counter() + args.budget_s
    self.records = []
    self.dense_choice = {}   # (HQ, HKV, Dk, Dv) -> candidate name that ran
    self.document, self.packed_Ts = PACKED_SMALL if args.small else (DOCUMENT_TOKENS,
                                                                      PACKED_TS)

  def record(self, shape: Shape, op: str, pass_: str, impl: str, result: dict,
             flops: int | None):
    rec = {"config": shape.config, "T": shape.T, "G": shape.G, "shape": dataclasses.asdict(shape),
           "op": op, "pass": pass_, "impl": impl, **result}
    if flops is not None:
      rec["flops"] = flops
      rec["floor_ms"] = flops / (self.rate * 1e12) * 1e3
    self.records.append(rec)
    what = (f"{rec['median_ms']:.3f} ms (floor {rec.get('floor_ms', float('nan')):.3f}, "
            f"compile {rec['compile_s']:.1f} s)" if "median_ms" in rec else
            rec.get("error") or rec.get("skipped"))
    print(f"[{shape.config} T={shape.T} G={shape.G}] {op} {pass_} ({impl}): {what}", flush=True)

  def out_of_time(self) -> bool:
    return time.perf_counter() > self.deadline

  def timed(self, fn, make):
    if self.out_of_time():
      return {"skipped": "time budget spent"}
    return bc.try_time_fn(fn, make, n_iter=self.args.n_iter, warmup=self.args.warmup)

  def run_shape(self, shape: Shape, branches: bool, peer: bool):
    flops = flop_counts(shape, self.config, self.document)
    dtype = self.args.dtype
    document = self.document if shape.config == "A" and shape.T in self.packed_Ts else None
    for op, impl, pass_, fn, make in nsa_cases(shape, self.config, self.impls, dtype, branches,
                                               document):
      result = self.timed(fn, make)
      if op == "nsa":
        on = nsa_cudnn_impls(shape, self.config, impl, dtype)
        result["compressed_impl"] = on["compressed_attention"]
        result["window_impl"] = on["window_attention"]
      if op == "nsa_packed":
        result["documents"] = document_lengths(shape.T, self.document)
      self.record(shape, op, pass_, impl, result, flops.get((op, pass_)))
    self.run_dense(shape, flops)
    if peer:
      result = time_fla_peer(shape, self.config) if not self.out_of_time() else {
          "skipped": "time budget spent"}
      for pass_ in ("fwd", "fwd+bwd"):
        peer_result = ({"median_ms": result[f"{pass_}_ms"], "compile_s": 0.0,
                        "note": result["note"]} if f"{pass_}_ms" in result else result)
        self.record(shape, "fla_parallel_nsa", pass_, "triton", peer_result, None)

  def run_dense(self, shape: Shape, flops):
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    make = lambda key: dense_inputs(shape, self.args.dtype, key)
    key = (shape.HQ, shape.HKV, shape.Dk, shape.Dv)
    candidates = dense_candidates(shape, impl)
    if key in self.dense_choice:
      candidates = [c for c in candidates if c[0] == self.dense_choice[key]]
    for name, f in candidates:
      result = self.timed(f, lambda k: make(k)[:3])
      if "error" not in result or result["error"].startswith("OOM"):
        break
      print(f"  dense variant {name} failed: {result['error']}")
    if "error" not in result:
      self.dense_choice.setdefault(key, name)
    tag = f"{impl}:{name}"
    self.record(shape, "dense", "fwd", tag, result, flops[("dense", "fwd")])
    self.record(shape, "dense", "fwd+bwd", tag, self.timed(bc.forward_backward(f, 3), make),
                flops[("dense", "fwd+bwd")])


RESEARCH_TOKENS = 65536   # tokens per call of the research shapes: B = RESEARCH_TOKENS // T


def research_shapes(args) -> list[Shape]:
  """The research shapes (module docstring) in priority order; --quick: the two presets'
  shapes at 8k and 64k; --small: one tiny shape (CPU)."""
  if args.small:
    return [Shape("H4G2D16", B=2, T=200, HQ=4, HKV=2, Dk=16, Dv=16)]
  shape = lambda HQ, G, D, T: Shape(f"H{HQ}G{G}D{D}", B=RESEARCH_TOKENS // T, T=T, HQ=HQ,
                                    HKV=HQ // G, Dk=D, Dv=D)
  presets = [(16, 4, 128), (8, 4, 64)]          # research, gpu-compare
  Ts = [8192, 65536] if args.quick else [8192, 32768, 65536, 16384]
  out = [shape(*p, T) for p in presets for T in Ts]
  if not args.quick:
    out += [shape(HQ, G, D, 8192) for HQ in (8, 16, 32) for G in (4, 8) for D in (64, 128)
            if (HQ, G, D) not in presets]
  return [s for s in out if not args.max_t or s.T <= args.max_t]


def shapes_to_run(args):
  """[(shape, branches, peer)] in priority order: what matters most runs first."""
  if args.research:
    return [(shape, False, False) for shape in research_shapes(args)]
  if args.small:   # T = 200: not a multiple of any block size; --quick: Config A only
    a = dict(B=1, HQ=8, HKV=2, Dk=32, Dv=32)
    T_a, T_big = [200], []
    g_sweep, T_b = ([], []) if args.quick else ([1, 2], [200])
  else:
    a = dict(B=1, HQ=64, HKV=4, Dk=128, Dv=128)
    T_a = [8192, 65536] if args.quick else [8192, 16384, 32768, 65536]
    T_big = [] if args.quick else [131072]
    g_sweep, T_b = [1, 2, 4, 8], T_a
  if args.packed:   # Config A where packed rows are timed, nothing else but cuDNN
    T_a, T_b, T_big, g_sweep = list(PACKED_SMALL[1] if args.small else PACKED_TS), [], [], []
  if args.max_t:
    T_a, T_b, T_big = ([T for T in Ts if T <= args.max_t] for Ts in (T_a, T_b, T_big))
  b = dict(a, Dk=192 if not args.small else 48)
  out = [(Shape("A", T=T, **a), not args.packed, not args.packed) for T in T_a]
  out += [(Shape("B", T=T, **b), False, True) for T in T_b]
  out += [(Shape(f"G{g}", T=T_a[-1], **dict(a, HKV=a["HQ"] // g)), False, False)
          for g in g_sweep if T_a]
  out += [(Shape("A", T=T, **a), False, True) for T in T_big]
  return out


def summary_rows(records):
  """One row per shape: NSA and dense times, speedups, floors."""
  by = {}
  for r in records:
    by.setdefault((r["config"], r["T"], r["G"]), {})[(r["op"], r["pass"])] = r
  rows = []
  for (config, T, G), recs in by.items():
    get = lambda op, p, k="median_ms": recs.get((op, p), {}).get(k)
    ratio = lambda a, b: a / b if a and b else None
    nf, nb = get("nsa", "fwd"), get("nsa", "fwd+bwd")
    df, db = get("dense", "fwd"), get("dense", "fwd+bwd")
    ff, fb = get("nsa", "fwd", "floor_ms"), get("nsa", "fwd+bwd", "floor_ms")
    rows.append([config, T, G, nf, nb, df, db, ratio(df, nf), ratio(db, nb), ff, fb,
                 ratio(nf, ff), ratio(nb, fb), get("fla_parallel_nsa", "fwd"),
                 get("fla_parallel_nsa", "fwd+bwd")])
  return rows


def packed_rows(records):
  """Config A's NSA with and without segment ids (issue #20's target: <= 1.10x)."""
  recs = {(r["T"], r["op"], r["pass"]): r for r in records if r["config"] == "A"}
  rows = []
  for (T, op, pass_), r in sorted(recs.items()):
    if op == "nsa_packed":
      plain, packed = recs.get((T, "nsa", pass_), {}).get("median_ms"), r.get("median_ms")
      rows.append([T, pass_, len(r.get("documents", [])), plain, packed,
                   packed / plain if packed and plain else None, r.get("floor_ms"),
                   r.get("error") or r.get("skipped")])
  return rows


def branch_rows(records):
  rows = []
  for r in records:
    if r["op"] not in ("nsa", "nsa_packed", "dense", "fla_parallel_nsa"):
      med, floor = r.get("median_ms"), r.get("floor_ms")
      rows.append([r["config"], r["T"], r["op"], r["pass"], r["impl"], med, floor,
                   med / floor if med and floor else None,
                   r.get("error") or r.get("skipped")])
  return rows


def plot(records, path):
  panels = {}
  for config in ("A", "B"):
    recs = [r for r in records if r["config"] == config and "median_ms" in r]
    if not recs:
      continue
    series = {}
    dense = "cuDNN" if any(r["impl"].startswith("cudnn") for r in recs) else "dense"
    for op, label in [("nsa", "NSA"), ("dense", dense), ("fla_parallel_nsa", "fla")]:
      for p in ("fwd", "fwd+bwd"):
        pts = sorted((r["T"], r["median_ms"]) for r in recs if r["op"] == op and r["pass"] == p)
        if pts:
          series[f"{label} {p}"] = tuple(zip(*pts))
    # speedup labels need NSA and cuDNN at the same T: align on NSA's T list
    for p in ("fwd", "fwd+bwd"):
      if f"NSA {p}" in series and f"{dense} {p}" in series:
        times = dict(zip(*series[f"{dense} {p}"]))
        series[f"{dense} {p}"] = (series[f"NSA {p}"][0],
                                  [times.get(T) for T in series[f"NSA {p}"][0]])
    panels[f"Config {config}"] = {
        "series": series, "ratios": [("NSA fwd", f"{dense} fwd"), ("NSA fwd+bwd", f"{dense} fwd+bwd")]}
  if panels:
    bc.plot_loglog(path, panels)


def plot_research(records, path):
  """Research shapes: NSA's speedup over cuDNN (fwd, fwd+bwd) per shape, one panel per T."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = summary_rows(records)   # [config, T, G, nsa fwd, nsa f+b, dense fwd, dense f+b, fwd x, f+b x]
  batch = {(r["config"], r["T"]): r["shape"]["B"] for r in records}
  Ts = sorted({r[1] for r in rows})
  if not Ts:
    return
  counts = [sum(r[1] == T for r in rows) for T in Ts]   # panel widths follow their bars
  fig, axes = plt.subplots(1, len(Ts), figsize=(max(6.0, 2 + 0.75 * sum(counts)), 4.5),
                           squeeze=False, gridspec_kw={"width_ratios": counts})
  for ax, T in zip(axes[0], Ts):
    here = sorted((r for r in rows if r[1] == T), key=lambda r: r[0])
    for k, (col, label) in enumerate(((7, "fwd"), (8, "fwd+bwd"))):
      xs = [i + 0.4 * k - 0.2 for i in range(len(here))]
      ys = [r[col] or 0 for r in here]
      ax.bar(xs, ys, width=0.4, label=label)
      for x, y in zip(xs, ys):
        ax.annotate(f"{y:.2g}x", (x, y), ha="center", va="bottom", fontsize=7)
    ax.axhline(1, color="gray", lw=1)
    ax.set_xticks(range(len(here)), [r[0] for r in here], rotation=45, ha="right", fontsize=8)
    Bs = sorted({batch[(r[0], T)] for r in here})
    length = f"{T // 1024}k" if T >= 1024 else str(T)
    ax.set_title(f"T = {length}, B = {', '.join(map(str, Bs))}")
    ax.set_ylabel("cuDNN time / NSA time")
  axes[0][0].legend(fontsize=8)
  fig.suptitle("NSA op vs cuDNN at research shapes (H query heads, G group, D head dim)",
               fontsize=10)
  bc.save_figure(fig, path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--impl", default="pallas", choices=("pallas", "xla"))
  parser.add_argument("--quick", action="store_true", help="T = 8k and 64k only")
  parser.add_argument("--packed", action="store_true",
                      help="only Config A at 8k and 64k: nsa with and without segment ids "
                           f"(documents of {DOCUMENT_TOKENS} tokens), and cuDNN")
  parser.add_argument("--research", action="store_true",
                      help="research shapes instead of configs A, B and the G sweep")
  parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
  parser.add_argument("--max-t", type=int, default=0, help="drop sequence lengths above this")
  parser.add_argument("--n-iter", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--budget-s", type=float, default=330.0,
                      help="stop starting new measurements after this many seconds")
  parser.add_argument("--out", default=bc.default_out_dir())
  args = parser.parse_args(argv)
  args.dtype = jnp.bfloat16
  start = time.perf_counter()

  config = bc.small_config() if args.small else NSAConfig()
  impls = bc.kernel_impls(args.impl)
  rate = bc.matmul_rate(n=256 if args.small else 8192)
  print(f"device {bc.gpu_name()}, jax {jax.__version__}, impls {impls}, "
        f"bf16 matmul {rate:.1f} TFLOP/s", flush=True)

  bench = Bench(args, config, impls, rate)
  for shape, branches, peer in shapes_to_run(args):
    bench.run_shape(shape, branches, peer)

  name = f"{'research_kernels' if args.research else 'bench_kernels'}_{bc.slug(bc.gpu_name())}"
  bc.write_json(os.path.join(args.out, name + ".json"), {
      "impls": impls, "matmul_tflops": rate, "dtype": "bfloat16",
      "flop_model": "fwd 2*(Dk+Dv) per visible (query, key) pair and head; bwd "
                    "2*(3*Dk+2*Dv) (flash recompute); nsa floor = compressed + selected + "
                    "window (top-n scoring fused with compressed)",
      "g_sweep": "HQ=64, HKV=64/G, Dk=Dv=128 at the largest T (G=16 is Config A)",
      "wall_s": time.perf_counter() - start, "records": bench.records}, config=config)
  (plot_research if args.research else plot)(bench.records, os.path.join(args.out, name + ".png"))

  print("\nbranches (ms; floor = matmul FLOPs / measured rate)")
  bc.print_table(["cfg", "T", "op", "pass", "impl", "ms", "floor", "x floor", "note"],
                 branch_rows(bench.records))
  if any(r["op"] == "nsa_packed" for r in bench.records):
    print(f"\npacked rows: nsa with segment ids (documents of {bench.document} tokens) vs "
          f"without, Config A, ms (target: packed / plain <= 1.10)")
    bc.print_table(["T", "pass", "docs", "nsa", "nsa packed", "packed / plain",
                    "floor packed", "note"], packed_rows(bench.records))
  print(f"\nNSA ({impls['nsa']}) vs dense, bf16, ms; bf16 matmul {rate:.0f} TFLOP/s; "
        f"wall {time.perf_counter() - start:.0f} s")
  bc.print_table(["cfg", "T", "G", "nsa fwd", "nsa f+b", "dense fwd", "dense f+b",
                  "speedup fwd", "speedup f+b", "floor fwd", "floor f+b",
                  "x floor fwd", "x floor f+b", "fla fwd", "fla f+b"],
                 summary_rows(bench.records))


if __name__ == "__main__":
  main()
