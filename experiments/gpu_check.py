"""GPU correctness check: the NSA ops against the float32 reference (SPEC §4), on a
list of shapes or on the shape matrix of issue #18 (`--matrix`).

What a case checks, on fresh random inputs (`bench_common.random_nsa_inputs`):
  - compressed_attention: o and lse (the -inf pattern exactly), and the
    gradients of q, k_cmp, v_cmp under random cotangents of o and lse (of o
    only for impl "cudnn", whose lse carries no gradient);
  - select_blocks: the selection must be a valid top-n of the reference's
    block scores (SPEC §3 "Selection"): right count, forced blocks in,
    non-candidates out, no duplicates, and no unselected candidate scoring
    more than a selected one beyond a near-tie tolerance (two correct
    implementations may break near-ties differently); the reference's own
    selection is held to the same test;
  - selected_attention (on the reference's block_idx) and window_attention:
    o and the gradients of q, k, v;
  - nsa: o and the gradients of all eight float inputs, against the gated sum
    of the reference branches run on the selection nsa made (returned by the
    same call), so that near-tie selection differences (checked above) do not
    count as errors. On a GPU, nsa's window and compressed branches are
    cuDNN's for the 16-bit inputs cuDNN takes (`nsa_jax.ops.dispatch`, under
    `nsa_jax.ops.cudnn.cudnn_runs`);
  - nsa_vs_select_blocks: the share of (query, KV head) rows where nsa's
    selection differs from `select_blocks`' on the same inputs with the same
    impl (SPEC §3 defines one selection; both take it from one lse,
    `nsa_jax.ops.selection.selection_lse`).
The reference runs in float32 on upcast inputs, at full matmul precision (XLA's
GPU default for float32 is TF32), with chunked, rematerialised backward passes.

Kinds of case: "reference" (the above on every row); "batch" (the last batch
row against the same row computed alone by the same op: issue #18's batch past
2^31 elements); "rows" (the last `rows` query rows against the reference
evaluated on those rows only, with all keys, under a cotangent that is zero on
the other rows: a 256k-token sequence). Probes are cases whose outcome informs
rather than judges (they are left out of the pass/fail counts): the issue's
cuDNN call unsplit (it must fail, or the check could not see the bug). The
first run's second probe, one call of 5 x 32k rows under the element limit
alone, passed: the split rule counts elements only (`nsa_jax.ops.cudnn`), and
"batch-7x32k" checks its largest call of such rows. "packed" (`--packed`, SPEC §6,
issue #20: packing is invisible): the ops on rows of several documents with
segment_ids against the reference run on each document alone, a batch row of its
own padded at its end (`nsa_jax.ops.segments.Alone`), the results mapped back (a
document's compressed blocks shifted by s/d, its selection by s/l'); the selection
is judged against the scores of the documents alone (padded rows apart) and must
hold no block outside its query's document.

Error: ||a - b|| / ||b|| over finite reference entries, plus a NaN / inf check;
max |a - b| / max |b| is reported beside it ("max_rel"), not judged: a 2-stage
backward miscompile that raised one gradient's max error 5x moved its norm
error only from ~2.5e-3 to 4e-3 (PERF_NOTES).
Thresholds: float32 1e-3 (Triton runs float32 dots in TF32, ~3e-4 relative
error, while the reference runs at "highest" precision; measured <= 5e-4 in
issue #18); bfloat16 2e-2 (the kernels round P, dS and outputs to bf16, eps
3.9e-3; the reference runs in float32 on the same bf16 inputs; measured <= 6e-3
in issue #18). The same thresholds judge the "batch" kind, where the wrong row
of issue #18 was 21 % off.

Speed (the matrix's ~75 cases must fit a few minutes of an H200 whose 16
CPUs compile them): a case's random inputs come from one small jitted function
(an "rbg" key: one XLA op); its ops are checked in three units (`UNIT_OF`),
each one jitted function of the inputs that returns error measures only. What
several ops need is computed once in a unit: the reference selection
(select_blocks, selected_attention); nsa's selection, taken from the checked
nsa call itself (nsa_vs_select_blocks); nsa and select_blocks for impls "auto"
and "pallas" where they run the same backends (`nsa_jax.ops.nsa.backends`:
float32 everywhere, cuDNN taking no float32; bf16 wherever no branch falls
back to the reference), recorded under each impl. A process lowers units in
order (tracing holds the GIL) while a thread pool compiles them (XLA's compile
releases it) and runs them in order. With --procs > 1 (the default with
--matrix: half the CPUs) the cases run in three phases, each in processes that
exit after it (`run_everywhere`: XLA's allocator keeps the memory it grew to; the
first full matrix run, with the large cases' process alive beside the workers,
lost 88 records of the small cases to out-of-memory errors): the large cases in
one process, then the "reference" cases one at a time to the first free of the
worker processes sharing the GPU, then the probes. XLA compiles with no
autotuning and no Triton GEMM fusions: cuBLAS runs the references' matmuls (a
check needs correct GEMMs, not the fastest, and each fusion was one more
Triton compile). Each record keeps its unit's seconds of lowering, compiling
and running. A unit that fails to lower, compile or run is retried op by op
while the budget lasts, so that the error lands on the op that caused it
("error" records, the run goes on). No case starts after --budget-s: those
are "skipped" (started ones finish).

--rerun PATH (a JSON of this script) runs only what PATH has no pass for: its
skipped, error and failed records and the cases it lacks (not its probes,
whose outcome informs), plus the cases --redo names; and writes one JSON of
both runs: PATH's records that were not redone and this run's, each record's
"run" indexing meta["runs"] (each run's command, time, wall, cuDNN limits and
own summary); "summary" counts the merged records. Exits non-zero on any
failure or error outside the probes (of the merged records).

Run on the device machine:
    python3 experiments/gpu_check.py                # SHAPES: a few minutes on an H200
    python3 experiments/gpu_check.py --matrix       # issue #18 (--budget-s 360)
    python3 experiments/gpu_check.py --matrix --rerun gpu_matrix_nvidia-h200.json
    python3 experiments/gpu_check.py --packed       # issue #20, packed rows (--budget-s 360)
    python3 experiments/gpu_check.py --offsets      # issue #23, query offsets (one GPU)
    python3 experiments/gpu_check.py --small [--matrix | --packed | --offsets]   # tiny, CPU
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")   # reference backward is big

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

import bench_common as bc   # also puts the repo root on sys.path
from report import check_groups
from nsa_jax import (NSAConfig, compressed_attention, nsa, select_blocks,
                     selected_attention, window_attention)
from nsa_jax.ops import _common, compressed, cudnn, dispatch, segments, selected, window
from nsa_jax.ops.compressed import compressed_scores
from nsa_jax.ops.nsa import backends as nsa_backends
from nsa_jax.ops.nsa import sparse_branches as nsa_sparse_branches
from nsa_jax.ops.selection import lse_backend, overlap_to_select_blocks

RTOL = {"float32": 1e-3, "bfloat16": 2e-2}
# Near-tie tolerance of the selection, relative to the row's largest
# non-forced candidate score: scores are sums of softmax probabilities that
# the two implementations compute in different orders (float32 inputs: TF32).
TIE_RTOL = 5e-3
# Share of rows where nsa's selection may differ from select_blocks' (issue
# #18's bounds). Both select from one lse by construction, so 0 is expected.
SELECTION_TOL = {"float32": 0.0, "bfloat16": 1e-3}
OPS = ("compressed_attention", "select_blocks", "selected_attention",
       "window_attention", "nsa", "nsa_vs_select_blocks")
NSA_ARGS = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")
QUERY_ARGS = ("q", "gates")   # inputs indexed by query position, the others by key
BLOCK_ARGS = ("k_cmp", "v_cmp")   # inputs indexed by compressed block


@dataclasses.dataclass(frozen=True)
class Case:
  """One shape and dtype and what is checked on it (module doc: kinds, probes).

  ops: (op, impl) pairs, impl as the op's `impl` argument.
  rows: the query rows checked by a "rows" case (the last ones).
  limits: ((name, value), ...) of `nsa_jax.ops.cudnn` limits set while tracing.
  probe: what a probe case shows ("" for an ordinary case).
  runs: a "packed" case's documents: the lengths of the runs of equal segment ids
    of each batch row (each a multiple of select_block but a row's last).
  """
  shape: bc.Shape
  dtype: str
  ops: tuple[tuple[str, str], ...]
  kind: str = "reference"
  rows: int = 0
  limits: tuple[tuple[str, int], ...] = ()
  probe: str = ""
  runs: tuple[tuple[int, ...], ...] = ()

  @property
  def name(self) -> str:
    return self.shape.config

  def segment_ids(self) -> np.ndarray:
    """[B, T] int32 of a "packed" case: run r of a row has id r."""
    return np.stack([np.repeat(np.arange(len(r)), r) for r in self.runs]).astype(np.int32)


def cases_of(shapes, ops) -> list[Case]:
  """One "reference" case per shape and dtype of `shapes` (bc.Shape lists)."""
  return [Case(s, dtype, ops) for s in shapes for dtype in s.dtypes]


# Priority order: a spent time budget skips the last ones. Small odd shapes
# first (they compile and run fast), then Config A.
SHAPES = (
    bc.Shape("T20-noblock", 1, 20, 16, 1, 128, 128, ("float32",)),   # T < l: Tc = 0
    bc.Shape("T300-B2-G3", 2, 300, 6, 2, 64, 64, ("float32",)),   # G not a power of 2, T < w
    bc.Shape("T8191-G1", 1, 8191, 8, 8, 128, 128, ("float32",)),
    bc.Shape("T8191-G2", 1, 8191, 8, 4, 128, 128, ("bfloat16",)),
    bc.Shape("A-8k", 1, 8192, 64, 4, 128, 128, ("bfloat16", "float32")),
    bc.Shape("T8191-G16-Dk192", 1, 8191, 32, 2, 192, 128, ("bfloat16", "float32")),
    bc.Shape("A-16k", 1, 16384, 64, 4, 128, 128, ("bfloat16",)),
)
SMALL_SHAPES = (
    bc.Shape("small-G2", 1, 100, 4, 2, 32, 32, ("float32",)),
    bc.Shape("small-B2-G3-Dk48", 2, 45, 3, 1, 48, 32, ("bfloat16",)),
)



def packed_cases(small: bool, ops) -> list[Case]:
  """--packed (issue #20): documents shorter than one compressed block (a row's
  last), exactly one selection block, crossing many; G 2, 16 (Config A at 8k with
  documents of ~4k tokens) and Dk 192 != Dv; f32 and bf16, in priority order (a
  spent budget skips the last). --small: tiny, CPU."""
  if small:   # small_config(): l = 16, l' = 32
    return [Case(bc.Shape("packed-small-G2", 2, 100, 4, 2, 32, 16), "float32", ops,
                 kind="packed", runs=((32, 64, 4), (96, 4)))]
  a8k = lambda dtype: Case(bc.Shape("packed-A-8k", 1, 8192, 64, 4, 128, 128), dtype, ops,
                           kind="packed", runs=((704, 64, 3328, 4096),))
  t990 = lambda dtype: Case(bc.Shape("packed-T990-G2", 2, 990, 8, 4, 128, 128), dtype, ops,
                            kind="packed", runs=((64, 448, 448, 30), (192, 768, 30)))
  return [a8k("bfloat16"), t990("float32"), t990("bfloat16"),
          Case(bc.Shape("packed-T990-G16-Dk192", 1, 990, 32, 2, 192, 128), "bfloat16", ops,
               kind="packed", runs=((128, 832, 30),)),
          a8k("float32")]


# --matrix: issue #18's head sizes (Dk, Dv) and group sizes.
MATRIX_HEADS = ((32, 32), (64, 64), (96, 96), (128, 128), (192, 128), (256, 256))
MATRIX_GROUPS = (1, 2, 4, 8, 16)
MATRIX_OPS = (("compressed_attention", "pallas"), ("select_blocks", "pallas"),
              ("selected_attention", "pallas"), ("window_attention", "pallas"),
              ("nsa", "auto"), ("nsa", "pallas"),
              ("nsa_vs_select_blocks", "auto"), ("nsa_vs_select_blocks", "pallas"))
UNLIMITED = 2 ** 62


def matrix_cases(small: bool) -> list[Case]:
  """Issue #18's matrix in priority order: tensors past 2^31 (cuDNN's split
  calls), then every head size x group size in bf16 and f32 at T = 1000 and
  T = 300 < w (B = 2), then the probe (last: the unsplit call could hurt the
  process). --small: the kinds at tiny sizes, Pallas in interpret mode."""
  if small:
    shape = bc.Shape
    return [
        Case(shape("batch", 3, 40, 4, 2, 16, 16), "bfloat16", kind="batch",
             ops=(("window_attention", "pallas"), ("nsa", "pallas"))),
        Case(shape("rows", 1, 70, 4, 1, 16, 16), "float32", kind="rows", rows=16,
             ops=(("compressed_attention", "pallas"), ("window_attention", "pallas"),
                  ("nsa", "pallas"), ("nsa_vs_select_blocks", "pallas"))),
        Case(shape("D16/16-G2", 2, 45, 4, 2, 16, 16), "float32", MATRIX_OPS),
        Case(shape("T30-D24/16-G1", 2, 30, 2, 2, 24, 16), "bfloat16", MATRIX_OPS),
    ]
  issue = dict(HQ=64, HKV=4, Dk=128, Dv=128)
  cudnn_ops = (("window_attention", "auto"), ("compressed_attention", "cudnn"), ("nsa", "auto"))
  cases = [
      Case(bc.Shape("batch-9x32k", B=9, T=32768, **issue), "bfloat16", cudnn_ops, kind="batch"),
      # The largest call the rule makes of such rows (7 x 2^28 elements): the last
      # row's offsets lie past 2^31 bytes, past 2^32 in the float32 dq accumulator.
      Case(bc.Shape("batch-7x32k", B=7, T=32768, **issue), "bfloat16", cudnn_ops, kind="batch"),
      Case(bc.Shape("row-256k", B=1, T=262144, **issue), "bfloat16",
           cudnn_ops + (("nsa_vs_select_blocks", "auto"),), kind="rows", rows=256),
  ]
  for dtype in ("bfloat16", "float32"):
    for Dk, Dv in MATRIX_HEADS:
      cases += [Case(bc.Shape(f"D{Dk}/{Dv}-G{G}", 2, 1000, 2 * G, 2, Dk, Dv), dtype, MATRIX_OPS)
                for G in MATRIX_GROUPS]
      cases.append(Case(bc.Shape(f"T300-D{Dk}/{Dv}-G4", 2, 300, 8, 2, Dk, Dv), dtype, MATRIX_OPS))
  window_cudnn = (("window_attention", "cudnn"),)
  cases.append(Case(
      bc.Shape("probe-unsplit-9x32k", B=9, T=32768, **issue), "bfloat16", window_cudnn,
      kind="batch", limits=(("MAX_ELEMENTS", UNLIMITED),),
      probe="the issue's window call unsplit: expected to fail (#18.1 seen by this check)"))
  return cases


# --offsets (issue #23): what each shard of a context mesh runs (`nsa_jax.context.local_nsa`):
# the compressed branch, the selection and the selected branch of a slice of the queries at a
# traced query offset, against all keys (the ops' private `q_offset`: the Pallas kernels on a
# GPU, as cuDNN takes none), checked against the same branches over all queries at offset 0,
# so on the same backends. (Against `nsa` unsharded, whose compressed branch and selection
# lse run on cuDNN in 16-bit, the selection differs on a few % of rows in bf16: the lse's
# rounding moves near-ties: README, "Context parallelism".)
# `rows` is the slice length (a shard's Tl). Needs one GPU; the sharded layer and training
# step are tests/test_context.py (CPU devices).
def offsets_cases(small: bool) -> list[Case]:
  """Slices not a multiple of any block (T = 3000 in 3), G = 4 and 8, Dk != Dv, and
  packed rows whose documents cross the slices; bf16 and f32."""
  ops = (("sparse_branches", "pallas"), ("sparse_branches_selection", "pallas"))
  if small:   # small_config(): l = 16, l' = 32
    return [Case(bc.Shape("offsets-small-G2", 2, 90, 4, 2, 32, 16), "float32", ops,
                 kind="offsets", rows=30, runs=((32, 58), (64, 26)))]
  cases = []
  for dtype in ("bfloat16", "float32"):
    cases += [
        Case(bc.Shape("offsets-T4096-G4", 2, 4096, 16, 4, 128, 128), dtype, ops,
             kind="offsets", rows=1024),
        Case(bc.Shape("offsets-T3000-G8-Dk192", 1, 3000, 8, 1, 192, 128), dtype, ops,
             kind="offsets", rows=1000),
        Case(bc.Shape("offsets-packed-T4096-G16", 1, 4096, 32, 2, 64, 64), dtype, ops,
             kind="offsets", rows=1024, runs=((1536, 64, 2496),)),
    ]
  return cases


def offsets_function(case: Case, config: NSAConfig):
  """f(inputs) -> {"sparse_branches|pallas": outputs (o_cmp, o_slc) and the gradients of
  q, k_cmp, v_cmp, k_slc, v_slc, "sparse_branches_selection|pallas": the share of (query,
  KV head) rows whose selection differs}, of the slices at their offsets against the
  whole call at offset 0."""
  s = case.shape
  ids = jnp.asarray(case.segment_ids()) if case.runs else None
  names = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc")

  def branches(q, k_cmp, v_cmp, k_slc, v_slc, q_offset):
    impls = nsa_backends(q, k_cmp, v_cmp, k_slc, v_slc, k_slc, v_slc, config=config,
                         impl="pallas", packed=ids is not None, offset=True)
    return nsa_sparse_branches(q, k_cmp, v_cmp, k_slc, v_slc, impls=impls, config=config,
                               scale=None, impl="pallas", interpret=None, segment_ids=ids,
                               q_offset=q_offset)

  def sliced(offsets, q, *kv):   # offsets: traced int32, as lax.axis_index gives a shard
    parts = [branches(q[:, i * case.rows:(i + 1) * case.rows], *kv, offsets[i])
             for i in range(s.T // case.rows)]
    return tuple(jnp.concatenate(p, axis=1) for p in zip(*parts))

  def f(x, offsets):
    args = [x[n] for n in names]
    cts = (x["cotangent"], x["cotangent"][..., ::-1])   # o_cmp's, o_slc's
    run = lambda fn: jax.vjp(lambda *a: (lambda r: (r[:2], r[2]))(fn(*a)), *args, has_aux=True)
    (o, vjp, idx), (o_ref, vjp_ref, idx_ref) = (
        run(lambda *a: sliced(offsets, *a)), run(lambda *a: branches(*a, jnp.int32(0))))
    m = {name: measure(a, b) for name, a, b in zip(("o_cmp", "o_slc"), o, o_ref)}
    m |= {f"d{n}": measure(a, b) for n, a, b in zip(names, vjp(cts), vjp_ref(cts))}
    differing = rows_differing(idx, idx_ref) / idx[..., 0].size
    return {"sparse_branches|pallas": m, "sparse_branches_selection|pallas": {
        "block_idx": {"rel": differing, "max_rel": differing, "ok": True}}}
  return f


def check_offsets(cases, config: NSAConfig, deadline: float) -> list[dict]:
  """Records of the --offsets cases, one at a time (few and small)."""
  records = []
  for case in cases:
    if time.time() > deadline:
      records += skipped(case)
      continue
    start = time.perf_counter()
    try:
      s = case.shape
      if s.T % case.rows:
        raise ValueError(f"{case.name}: T={s.T} is not a multiple of the slice {case.rows}")
      x = jax.jit(case_inputs(case, config))(jax.random.key(zlib.crc32(case.name.encode())))
      offsets = jnp.arange(0, s.T, case.rows, dtype=jnp.int32)
      with reference_precision(case.dtype):
        metrics = jax.device_get(jax.jit(offsets_function(case, config))(x, offsets))
      records += [record(case, *key.split("|"), metrics=m, seconds={
          "total": time.perf_counter() - start}) for key, m in metrics.items()]
    except Exception as err:   # recorded, the run goes on
      records += [record(case, op, impl, "error", message=bc.describe_error(err))
                  for op, impl in case.ops]
    print(f"{case.name} {case.dtype} (offsets, {time.perf_counter() - start:.1f} s): "
          f"{records[-1]['status']} {records[-1]['message']}", flush=True)
  return records


# ----------------------------------------------------------------------------
# Error measures (traced inside each case's jitted function)
# ----------------------------------------------------------------------------
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


def reference_precision(dtype: str):
  """float32 references at full precision (XLA's GPU default for float32 is TF32)."""
  return jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()


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


def selection_check(block_idx, scores, *, config: NSAConfig, valid=None):
  """(rows breaking a hard rule, worst near-tie gap) of a selection [B, T, HKV, n].

  Hard rules (SPEC §3): entries in [-1, Ts), no duplicates, min(n, #candidates)
  blocks, all of them candidates (j*l' <= t), the forced blocks among them.
  The gap of a row is (best unselected candidate - worst selected non-forced
  block) / largest non-forced candidate score, clipped at 0: 0 for an exact
  top-n, small for a near-tie swap. valid: [B, T] bool, the rows judged (all).
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
  if valid is not None:
    bad, gap = bad & valid[..., None], jnp.where(valid[..., None], gap, 0.0)
  return jnp.sum(bad), jnp.max(gap)


def rows_differing(a, b):
  """Rows (query, KV head) whose selected sets differ, order ignored."""
  return jnp.sum(jnp.any(jnp.sort(a, axis=-1) != jnp.sort(b, axis=-1), axis=-1))


def gated_reference(config: NSAConfig, first: int = 0):
  """nsa's formula (paper Eq. 5) over the reference branches, with a given
  selection, for the queries at positions first, first + 1, ... (all keys given)."""
  def f(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, block_idx):
    kw = dict(config=config, scale=_common.resolve_scale(None, q), first=first)
    g = gates[..., None]
    return (g[..., 0, :] * compressed.compressed_attention_xla(q, k_cmp, v_cmp, **kw)[0]
            + g[..., 1, :] * selected.selected_attention_xla(q, k_slc, v_slc, block_idx, **kw)
            + g[..., 2, :] * window.window_attention_xla(q, k_win, v_win, **kw))
  return f


def upcast(tree):
  """float32 copies of the floating leaves (the reference's inputs)."""
  return jax.tree.map(
      lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def measure(a, b) -> dict:
  err, max_rel, ok = compare(a, b)
  return {"rel": err, "max_rel": max_rel, "ok": ok}


# ----------------------------------------------------------------------------
# A case: its random inputs, then its units (jitted functions of the inputs)
# ----------------------------------------------------------------------------
# A case's ops are checked in units, one jitted function each, that compile
# concurrently. Ops that share computed values share a unit: select_blocks and
# selected_attention the reference selection, nsa and nsa_vs_select_blocks the
# selection nsa made; the two flash-style branches share nothing but are small.
UNIT_OF = {"compressed_attention": "branches", "window_attention": "branches",
           "select_blocks": "selection", "selected_attention": "selection",
           "nsa": "nsa", "nsa_vs_select_blocks": "nsa"}


def units(case: Case) -> list[Case]:
  """`case` split into its units: cases holding the ops of one unit each."""
  groups = {}
  for op in case.ops:
    groups.setdefault(UNIT_OF[op[0]], []).append(op)
  return [dataclasses.replace(case, ops=tuple(ops)) for ops in groups.values()]


def case_inputs(case: Case, config: NSAConfig):
  """key -> the case's random inputs (`bc.random_nsa_inputs`, with "cotangent")
  and "d_lse", a random cotangent of the compressed branch's lse."""
  s = case.shape

  def make(key):
    x = bc.random_nsa_inputs(s.B, s.T, s.HQ, s.HKV, s.Dk, s.Dv, config,
                             jnp.dtype(case.dtype), key)
    x["d_lse"] = jax.random.normal(jax.random.fold_in(key, 1), (s.B, s.T, s.HQ), jnp.float32)
    return x
  return make


def differentiable(op: str, config: NSAConfig, impl: str, first: int, segment_ids=None):
  """(arg names, op under test (on packed rows where segment_ids), reference on
  float32 queries from `first`, output names) of an op with gradients. Both take
  (*args, block_idx) and return (outputs, aux): nsa's aux is the selection it made,
  the others' None."""
  ref_kw = lambda q: dict(config=config, scale=_common.resolve_scale(None, q), first=first)
  kw = dict(config=config, impl=impl, segment_ids=segment_ids)
  if op == "compressed_attention":
    return (("q", "k_cmp", "v_cmp"),
            lambda q, k, v, _: (compressed_attention(q, k, v, **kw), None),
            lambda q, k, v, _: (compressed.compressed_attention_xla(q, k, v, **ref_kw(q)), None),
            ("o", "lse"))
  if op == "selected_attention":
    return (("q", "k_slc", "v_slc"),
            lambda q, k, v, idx: (selected_attention(q, k, v, idx, **kw), None),
            lambda q, k, v, idx: (selected.selected_attention_xla(q, k, v, idx, **ref_kw(q)),
                                  None),
            ("o",))
  if op == "window_attention":
    return (("q", "k_win", "v_win"),
            lambda q, k, v, _: (window_attention(q, k, v, **kw), None),
            lambda q, k, v, _: (window.window_attention_xla(q, k, v, **ref_kw(q)), None),
            ("o",))
  assert op == "nsa", op
  reference = gated_reference(config, first)
  return (NSA_ARGS,
          lambda *a: nsa(*a[:-1], **kw, return_block_idx=True),
          lambda *a: (reference(*a), None), ("o",))


def forward_backward(fn, args, block_idx, cotangent):
  """((outputs, gradients of args under `cotangent`), aux) of fn(*args, block_idx)."""
  out, vjp, aux = jax.vjp(lambda *a: fn(*a, block_idx), *args, has_aux=True)
  return (out, vjp(cotangent)), aux


def unit_function(case: Case, config: NSAConfig):
  """f(inputs) -> {"op|impl": {quantity: {"rel", "max_rel", "ok", ...}}} for every
  op of `case` (one unit), on the inputs `case_inputs` makes."""
  s, dtype = case.shape, case.dtype
  highest = lambda: reference_precision("float32")
  packed = case.kind == "packed"
  segment_ids = case.segment_ids() if packed else None
  docs = segments.Alone(segment_ids, config) if packed else None
  # The reference's view of an input: a "packed" case's documents alone.
  view = (lambda name, a: docs.alone(a, blocks=name in BLOCK_ARGS)) if packed else (
      lambda name, a: a)

  def f(x):
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    memo = {}

    def once(name, fn):   # values several ops need, computed once
      if name not in memo:
        memo[name] = fn()
      return memo[name]

    def nsa_key(impl):   # impls with equal backends compute the same: once
      backends = nsa_backends(*(x[n] for n in NSA_ARGS[:-1]), config=config, impl=impl,
                              packed=packed)
      return tuple(sorted(backends.items()))

    def alone_key(impl):   # what select_blocks(impl=impl) runs: its kernel, its lse's pass
      call = dispatch.Call(dict(q=x["q"], k_cmp=x["k_cmp"]), config, None, packed)
      return (dispatch.choose("select_blocks", impl, call),
              lse_backend(x["q"], x["k_cmp"], config=config, impl=impl, packed=packed))

    def selection_alone(impl):
      return once(("select_blocks", alone_key(impl)),
                  lambda: select_blocks(x["q"], x["k_cmp"], config=config, impl=impl,
                                        segment_ids=seg))

    def reference_selection():   # of the documents alone in a "packed" case
      with reference_precision(dtype):
        return select_blocks(view("q", x["q"]), view("k_cmp", x["k_cmp"]), config=config,
                             impl="xla")

    def gradients(op, impl):
      """(errors of the op's outputs and gradients, the op's aux)."""
      first = s.T - case.rows if case.kind == "rows" else 0
      names, fn, ref_fn, outputs = differentiable(op, config, impl, first, seg)
      idx = once("xla", reference_selection) if op == "selected_attention" else None
      if packed and idx is not None:
        idx = docs.packed_selection(idx)
      ct = x["cotangent"]
      if op == "compressed_attention":   # cuDNN's lse carries no gradient
        ct = (ct, jnp.zeros_like(x["d_lse"]) if impl == "cudnn" else x["d_lse"])
      if case.kind == "rows":   # a cotangent that is zero on the other rows
        keep = (jnp.arange(s.T) >= first)[None, :, None]
        ct = jax.tree.map(lambda c: c * keep[..., None] if c.ndim == 4 else c * keep, ct)
      args = [x[n] for n in names]
      quantities = list(outputs) + ["d" + n for n in names]
      along = [True] * len(outputs) + [n in QUERY_ARGS for n in names]   # per query row?
      got, aux = forward_backward(fn, args, idx, ct)
      got = jax.tree.leaves(got)
      if op == "nsa":   # the reference runs on the selection nsa made
        idx = aux
      if case.kind == "batch":   # the last row within the batch against that row alone
        last = lambda t: jax.tree.map(lambda a: a[-1:], t)
        got, (want, _) = last(got), forward_backward(fn, last(args), last(idx), last(ct))
      elif packed:   # against the reference on the documents alone, mapped back
        ref_args = [view(n, a) for n, a in zip(names, args)]
        with highest():
          want, _ = forward_backward(ref_fn, upcast(ref_args),
                                     None if idx is None else docs.alone_selection(idx),
                                     upcast(jax.tree.map(docs.alone, ct)))
        blocks = [False] * len(outputs) + [n in BLOCK_ARGS for n in names]
        want = [docs.packed(b, a.shape, blocks=by_block)
                for by_block, a, b in zip(blocks, got, jax.tree.leaves(want))]
      elif case.kind == "rows":   # the last rows against the reference on those rows only
        rows = lambda t: jax.tree.map(lambda a: a[:, first:], t)
        got = [rows(a) if per_row else a for per_row, a in zip(along, got)]
        ref_args = [rows(a) if n in QUERY_ARGS else a for n, a in zip(names, args)]
        with highest():
          want, _ = forward_backward(ref_fn, upcast(ref_args), rows(idx), upcast(rows(ct)))
      else:
        with highest():
          want, _ = forward_backward(ref_fn, upcast(args), idx, upcast(ct))
      return {q: measure(a, b) for q, a, b in zip(quantities, got, jax.tree.leaves(want))}, aux

    def nsa_check(impl):
      return once(("nsa", nsa_key(impl)), lambda: gradients("nsa", impl))

    def nsa_selection(impl):   # from the checked nsa call where there is one
      if any(op == "nsa" and nsa_key(other) == nsa_key(impl) for op, other in case.ops):
        return nsa_check(impl)[1]
      return once(("nsa forward", nsa_key(impl)), lambda: nsa(
          *(x[n] for n in NSA_ARGS), config=config, impl=impl, return_block_idx=True,
          segment_ids=seg)[1])

    def selection(impl):
      got = selection_alone(impl)
      ref = once("xla", reference_selection)
      with reference_precision(dtype):
        scores = reference_scores(view("q", x["q"]), view("k_cmp", x["k_cmp"]), config=config)
      valid = docs.valid() if packed else None
      out = {}
      for name, idx in [("block_idx", docs.alone_selection(got) if packed else got),
                        ("block_idx[xla]", ref)]:
        bad, gap = selection_check(idx, scores, config=config, valid=valid)
        out[name] = {"rel": gap, "max_rel": gap, "ok": bad == 0, "bad_rows": bad}
      if packed:   # blocks outside the query's document (dropped by alone_selection)
        outside = rows_differing(got, docs.packed_selection(docs.alone_selection(got)))
        out["block_idx"].update(ok=out["block_idx"]["ok"] & (outside == 0),
                                rows_outside_document=outside)
      out["block_idx"]["rows_differing_from_xla"] = rows_differing(
          got, docs.packed_selection(ref) if packed else ref)
      return out

    def agreement(impl):
      ours = nsa_selection(impl)
      differ = rows_differing(ours, selection_alone(impl))
      share = differ / ours[..., 0].size
      return {"block_idx": {"rel": share, "max_rel": share, "ok": True,
                            "rows_differing": differ}}

    checks = {"select_blocks": selection, "nsa_vs_select_blocks": agreement,
              "nsa": lambda impl: nsa_check(impl)[0]}
    return {f"{op}|{impl}": checks[op](impl) if op in checks else gradients(op, impl)[0]
            for op, impl in case.ops}
  return f


@contextlib.contextmanager
def cudnn_limits(limits):
  """Sets `nsa_jax.ops.cudnn` limit constants while a unit is traced (probes)."""
  saved = {name: getattr(cudnn, name) for name, _ in limits}
  try:
    for name, value in limits:
      setattr(cudnn, name, value)
    yield
  finally:
    for name, value in saved.items():
      setattr(cudnn, name, value)


# ----------------------------------------------------------------------------
# Running: lower in order, compile in a pool, run in order
# ----------------------------------------------------------------------------
def tolerance(op: str, dtype: str) -> float:
  return {"select_blocks": TIE_RTOL, "nsa_vs_select_blocks": SELECTION_TOL[dtype],
          "sparse_branches_selection": SELECTION_TOL[dtype]}.get(op, RTOL[dtype])


class Runner:
  """Runs cases in this process: lowers their units in order (tracing holds the
  GIL), compiles them in a thread pool (XLA's compile releases it) and runs them
  in order. No case starts after `deadline` (a time.time() value)."""

  def __init__(self, config: NSAConfig, deadline: float, workers: int):
    self.config = config
    self.deadline = deadline
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)

  def submit(self, unit: Case, shapes):
    """Lowers `unit` for inputs of `shapes` here and compiles it in the pool: a
    future of (compiled function, {"lower": s, "compile": s}), or of the error."""
    start = time.perf_counter()
    try:
      with cudnn_limits(unit.limits):
        lowered = jax.jit(unit_function(unit, self.config)).lower(shapes)
    except Exception as err:   # a lowering error is the unit's result
      failed = concurrent.futures.Future()
      failed.set_exception(err)
      return failed
    seconds = {"lower": time.perf_counter() - start}

    def compile_():
      start = time.perf_counter()
      compiled = lowered.compile()
      return compiled, dict(seconds, compile=time.perf_counter() - start)
    return self.pool.submit(compile_)

  def start(self, case: Case):
    """Lowers the case's units and submits their compiles: what `finish` takes."""
    make = jax.jit(case_inputs(case, self.config))
    # The same inputs in any process; "rbg": one XLA op, not threefry's hundreds.
    key = jax.random.key(zlib.crc32(f"{case.name}|{case.dtype}".encode()), impl="rbg")
    shapes = jax.eval_shape(make, key)
    return make, key, [(unit, self.submit(unit, shapes)) for unit in units(case)]

  def finish(self, case: Case, started) -> list[dict]:
    """Makes the case's inputs and runs its compiled units: its records."""
    make, key, jobs = started
    try:
      x = make(key)
    except Exception as err:   # out of memory, say: no op can run
      return [record(case, op, impl, "error", message=bc.describe_error(err))
              for op, impl in case.ops]
    return [r for unit, future in jobs for r in self.finish_unit(unit, future, x)]

  def finish_unit(self, unit: Case, future, x) -> list[dict]:
    """Runs a compiled unit: its records. A unit that fails to lower, compile or
    run is retried op by op while the budget lasts, so that the error lands on
    the op that caused it; past the budget its ops get its error."""
    try:
      compiled, seconds = future.result()
      start = time.perf_counter()
      metrics = jax.device_get(compiled(x))
      seconds["run"] = time.perf_counter() - start
    except Exception as err:
      message = bc.describe_error(err)
      if len(unit.ops) > 1 and time.time() <= self.deadline:
        singles = [dataclasses.replace(unit, ops=(op,)) for op in unit.ops]
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x)
        futures = [self.submit(single, shapes) for single in singles]
        return [r for single, fut in zip(singles, futures)
                for r in self.finish_unit(single, fut, x)]
      note = "" if len(unit.ops) == 1 else " (error of its unit; budget spent, not retried alone)"
      return [record(unit, op, impl, "error", message=message + note) for op, impl in unit.ops]
    return [record(unit, op, impl, metrics=metrics[f"{op}|{impl}"], seconds=seconds)
            for op, impl in unit.ops]

  def run(self, cases, label: str = "") -> list[dict]:
    """Lowers every case in order (compiles proceed meanwhile), then runs them in order."""
    jobs = [(case, None if time.time() > self.deadline else self.start(case)) for case in cases]
    records = []
    for case, started in jobs:
      start = time.perf_counter()
      done = skipped(case) if started is None else self.finish(case, started)
      records += done
      statuses = " ".join(f"{r['op']}[{r['impl']}]={r['status']}" for r in done)
      print(f"{label}{case.name} {case.dtype} ({case.kind}, {time.perf_counter() - start:.1f} s "
            f"after lowering): {statuses}", flush=True)
    self.pool.shutdown(wait=False, cancel_futures=True)
    return records


def run_cases(cases, small: bool, deadline: float, workers: int, label: str) -> list[dict]:
  """`Runner.run` in a worker process."""
  config = bc.small_config() if small else NSAConfig()
  return Runner(config, deadline, workers).run(cases, label)


def skipped(case: Case) -> list[dict]:
  return [record(case, op, impl, "skipped", message="time budget spent") for op, impl in case.ops]


def record(case: Case, op: str, impl: str, status: str | None = None, *,
           metrics: dict | None = None, seconds: dict | None = None, message: str = "") -> dict:
  """One record per (case, op, impl): its errors by quantity and its status;
  `seconds`: lowering, compiling and running the unit that checked it."""
  s, tol = case.shape, tolerance(op, case.dtype)
  out = {"case": case.name, "kind": case.kind, "op": op, "impl": impl,
         "shape": [s.B, s.T, s.HQ, s.HKV, s.Dk, s.Dv], "dtype": case.dtype,
         "tol": tol, "probe": case.probe or None,
         "seconds": seconds and {k: round(v, 2) for k, v in seconds.items()}}
  if metrics is None:
    return dict(out, status=status, message=message, errors={}, worst=None,
                rel_err=None, max_rel=None)
  errors = {q: {k: (bool(v) if k == "ok" else float(v)) for k, v in m.items()}
            for q, m in metrics.items()}
  worst = max(errors, key=lambda q: errors[q]["rel"])
  ok = all(m["ok"] and m["rel"] <= tol for m in errors.values())
  notes = [f"{q}: non-finite pattern or NaN" for q, m in errors.items() if not m["ok"]]
  return dict(out, status="pass" if ok else "fail", message="; ".join(notes), errors=errors,
              worst=worst, rel_err=errors[worst]["rel"], max_rel=errors[worst]["max_rel"])


def summarize(records) -> dict:
  counted = [r for r in records if not r["probe"]]
  return {status: sum(r["status"] == status for r in counted)
          for status in ("pass", "fail", "error", "skipped")}


# ----------------------------------------------------------------------------
# --rerun: what an earlier run left to do, and one JSON of both runs
# ----------------------------------------------------------------------------
def record_key(r: dict) -> tuple:
  return r["case"], r["dtype"], r["op"], r["impl"]


def left_to_do(cases, previous: dict, redo) -> list[Case]:
  """`cases` with only the ops `previous` (a JSON this script wrote) has no pass
  for (skipped, error, fail, or no record), and every op of the cases named in
  `redo`. Probes keep their outcome: theirs informs, a rerun would not judge it."""
  done = {record_key(r): r for r in previous["records"]}

  def todo(case, op, impl):
    r = done.get((case.name, case.dtype, op, impl))
    return case.name in redo or r is None or (r["status"] != "pass" and not r["probe"])

  left = [dataclasses.replace(c, ops=tuple(o for o in c.ops if todo(c, *o))) for c in cases]
  return [c for c in left if c.ops]


def runs_of(data: dict) -> list[dict]:
  """The runs whose records a JSON of this script holds (meta["runs"]; the run
  itself for a JSON written before --rerun existed)."""
  if "runs" in data["meta"]:
    return data["meta"]["runs"]
  return [dict(data["meta"], wall_s=data.get("wall_s"), cudnn_limits=data.get("cudnn_limits"),
               summary=data["summary"])]


def merge(previous: dict, records: list[dict], cases: list[dict]) -> tuple[list, list]:
  """(records, cases) of `previous` with this run's records in place of the ones
  they redo; cases: this run's case list, then previous cases no longer in it."""
  redone = {record_key(r) for r in records}
  kept = [dict(r, run=r.get("run", 0)) for r in previous["records"]
          if record_key(r) not in redone]
  names = {(c["config"], c["dtype"]) for c in cases}
  return kept + records, cases + [c for c in previous["cases"]
                                  if (c["config"], c["dtype"]) not in names]


def in_order(records: list[dict], cases: list[dict]) -> list[dict]:
  """`records` in the order of `cases` (a JSON's case list), a case's ops as in OPS (then
  --offsets' ops)."""
  order = {(c["config"], c["dtype"]): i for i, c in enumerate(cases)}
  ops = OPS + ("sparse_branches", "sparse_branches_selection")
  return sorted(records, key=lambda r: (order[(r["case"], r["dtype"])], ops.index(r["op"]),
                                        r["impl"]))


def print_summary(records) -> None:
  """Per (op, impl, dtype): passes and the worst error over its tolerance; then
  every record that did not pass, and the probes."""
  rows = []
  for op, impl, dtype, rs, worst in check_groups(records):
    rows.append([op, impl, dtype, f"{sum(r['status'] == 'pass' for r in rs)}/{len(rs)}",
                 worst and worst["case"], worst and worst["worst"],
                 worst and worst["rel_err"], rs[0]["tol"]])
  print()
  bc.print_table(["op", "impl", "dtype", "passed", "worst case", "quantity", "rel err", "tol"], rows)
  others = [r for r in records if r["status"] != "pass" or r["probe"]]
  if others:
    print()
    bc.print_table(["case", "dtype", "op", "impl", "status", "quantity", "rel err", "tol",
                    "probe / message"],
                   [[r["case"], r["dtype"], r["op"], r["impl"], r["status"], r["worst"],
                     r["rel_err"], r["tol"], (r["probe"] or r["message"])[:90]] for r in others])


def run_everywhere(cases, args, config, deadline: float, procs: int, workers: int) -> list[dict]:
  """Records of every case. One process (procs = 1) runs them all. Else in three phases,
  each in processes of its own that exit after it, so that a phase's GPU memory (XLA's
  allocator keeps what it grew to) is free for the next: the large cases in one
  process; then the "reference" cases (small, many), one at a time to the first free
  of `procs` worker processes sharing the GPU; then the probes (the unsplit call might
  take its process down: then only the probes are lost)."""
  if procs == 1:
    return Runner(config, deadline, workers).run(cases)
  probes = [c for c in cases if c.probe]
  shared = [c for c in cases if c.kind == "reference" and not c.probe]
  large = [c for c in cases if c not in shared and c not in probes]
  spawn = multiprocessing.get_context("spawn")   # a forked jax process is unsafe
  records = []
  for group, n, label in ((large, 1, "large"), (shared, procs, "shared"),
                          (probes, 1, "probe")):
    jobs = [[c] for c in group] if label == "shared" else [group] if group else []
    with concurrent.futures.ProcessPoolExecutor(n, mp_context=spawn) as pool:
      futures = [(job, pool.submit(run_cases, job, args.small, deadline, workers,
                                   f"[{label} {i + 1}/{len(jobs)}] "))
                 for i, job in enumerate(jobs)]
      for job, future in futures:
        try:
          records += future.result()
        except Exception as err:   # a worker process died: its cases are errors
          records += [record(c, op, impl, "error", message=bc.describe_error(err))
                      for c in job for op, impl in c.ops]
  return records


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--matrix", action="store_true",
                      help="issue #18's shape matrix (gpu_matrix_<gpu>.json)")
  parser.add_argument("--packed", action="store_true",
                      help="issue #20: packed rows against their documents alone "
                           "(gpu_packed_<gpu>.json)")
  parser.add_argument("--offsets", action="store_true",
                      help="issue #23: the sparse branches of query slices at query offsets "
                           "(a context shard's work) against the whole call at offset 0 "
                           "(gpu_offsets_<gpu>.json)")
  parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
  parser.add_argument("--impl", default="pallas", choices=("pallas", "xla"),
                      help="the side under test without --matrix (xla: checks this script "
                           "against itself)")
  parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
  parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  parser.add_argument("--rerun", default=None, metavar="PATH",
                      help="a JSON this script wrote: run only what it has no pass for and "
                           "write one JSON of both runs (module doc)")
  parser.add_argument("--redo", default="", metavar="CASES",
                      help="with --rerun: comma-separated cases to run again though they passed")
  parser.add_argument("--budget-s", type=float, default=None,
                      help="no case starts after this many seconds: the rest are skipped "
                           "(default 220, with --matrix or --packed 360)")
  cpus = os.cpu_count() or 1
  parser.add_argument("--procs", type=int, default=None,
                      help="processes sharing the GPU (tracing holds the GIL: one process "
                           f"lowers one unit at a time); default {max(1, cpus // 2)} with "
                           "--matrix, else 1")
  parser.add_argument("--workers", type=int, default=len(set(UNIT_OF.values())),
                      help="compile threads per process (default: the units of a case)")
  parser.add_argument("--out", default=bc.default_out_dir())
  args = parser.parse_args(argv)
  ops = [op for op in args.ops.split(",") if op]
  unknown = set(ops) - set(OPS)
  if unknown:
    parser.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
  if args.redo and not args.rerun:
    parser.error("--redo needs --rerun")
  budget_s = args.budget_s if args.budget_s is not None else (
      360.0 if args.matrix or args.packed else 220.0)
  procs = args.procs or (max(1, cpus // 2) if args.matrix else 1)
  if procs > 1:   # the processes share the GPU: each allocates what it uses
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  # A check needs correct GEMMs, not the fastest: no autotuning, and cuBLAS
  # rather than Triton GEMM fusions to compile (see "Speed" in the module doc).
  for flag in ("--xla_gpu_autotune_level=0", "--xla_gpu_enable_triton_gemm=false"):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + flag
  start, deadline = time.perf_counter(), time.time() + budget_s

  config = bc.small_config() if args.small else NSAConfig()
  if args.matrix:
    cases = [dataclasses.replace(c, ops=tuple(o for o in c.ops if o[0] in ops))
             for c in matrix_cases(args.small)]
  elif args.packed:
    cases = packed_cases(args.small, tuple((op, args.impl) for op in ops))
  elif args.offsets:
    cases = offsets_cases(args.small)
  else:
    cases = cases_of(SMALL_SHAPES if args.small else SHAPES, tuple((op, args.impl) for op in ops))
  cases = [c for c in cases if c.ops and (not args.cases or c.name in args.cases.split(","))]
  case_list = [dict(dataclasses.asdict(c.shape), dtype=c.dtype, kind=c.kind, rows=c.rows,
                    limits=dict(c.limits), probe=c.probe or None, runs=c.runs) for c in cases]
  previous = None
  if args.rerun:
    with open(args.rerun) as f:
      previous = json.load(f)
    cases = left_to_do(cases, previous, set(args.redo.split(",")) - {""})
  print(f"device {bc.gpu_name()}, jax {jax.__version__}, {len(cases)} cases "
        f"({sum(len(c.ops) for c in cases)} records), budget {budget_s:.0f} s, {procs} processes "
        f"x {args.workers} compile threads", flush=True)

  records = (check_offsets(cases, config, deadline) if args.offsets else
             run_everywhere(cases, args, config, deadline, procs, args.workers))
  summary = summarize(records)
  wall_s = time.perf_counter() - start
  this_run = dict(bc.run_meta(), wall_s=wall_s, cudnn_limits={"MAX_ELEMENTS": cudnn.MAX_ELEMENTS},
                  summary=summary)
  runs = runs_of(previous) if previous else []
  records = [dict(r, run=len(runs)) for r in records]
  if previous:
    records, case_list = merge(previous, records, case_list)
  records = in_order(records, case_list)

  merged = summarize(records)
  name = ("gpu_matrix" if args.matrix else "gpu_packed" if args.packed else
          "gpu_offsets" if args.offsets else "gpu_check")
  bc.write_json(os.path.join(args.out, f"{name}_{bc.slug(bc.gpu_name())}.json"), {
      "summary": merged, "wall_s": wall_s,
      "tolerances": {"rtol": RTOL, "select_blocks_tie_rtol": TIE_RTOL,
                     "nsa_vs_select_blocks_share": SELECTION_TOL,
                     "why": "module doc of experiments/gpu_check.py"},
      "cudnn_limits": this_run["cudnn_limits"], "cases": case_list, "records": records},
      config=config, extra_meta={"runs": runs + [this_run]})
  print_summary(records)
  print(f"\nthis run: {summary['pass']} passed, {summary['fail']} failed, {summary['error']} "
        f"errors, {summary['skipped']} skipped (probes apart); wall {wall_s:.0f} s")
  if previous:
    print(f"with {args.rerun}: {merged['pass']} passed, {merged['fail']} failed, "
          f"{merged['error']} errors, {merged['skipped']} skipped")
  return 1 if merged["fail"] or merged["error"] else 0


if __name__ == "__main__":
  sys.exit(main())
