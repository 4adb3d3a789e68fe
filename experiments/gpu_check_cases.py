"""What experiments/gpu_check.py checks: its cases, each a shape, a dtype, the (op, impl)
pairs checked on it and its kind ("reference", "batch", "rows", "packed"), in priority
order per mode (a spent time budget skips the last ones), and the probes, whose outcome
informs rather than judges. How a case is computed and compared against the reference:
gpu_check_units.py. The kinds and probes: docs/benchmarks.md#files-kinds-of-case-probes.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from experiments import bench_common as bc

OPS = ("compressed_attention", "select_blocks", "selected_attention",
       "window_attention", "nsa", "nsa_vs_select_blocks", "distill_teacher")


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
              ("nsa_vs_select_blocks", "auto"), ("nsa_vs_select_blocks", "pallas"),
              ("distill_teacher", "pallas"))
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
