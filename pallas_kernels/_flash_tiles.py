"""Tiles of the banded flash kernels (`pallas_kernels/_flash.py`): sizes, launch
parameters, their shared memory per program, and the fit to a device's budget.

Kept apart from the kernels so that a reader of the tiling rules (and the
shared-memory test, tests/test_shared_memory.py) needs no kernel code; the
measurements behind the defaults are in experiments/PERF_NOTES.md ("Measurements
behind the code's defaults").
"""
from __future__ import annotations

import dataclasses

from pallas_kernels import _util


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes and Triton launch parameters (defaults tuned on H100 / H200).

  Attributes:
    block_m: rows (tokens x padded group heads) per query tile; power of 2.
    block_k: keys per key tile; power of 2 >= 16.
    num_warps, num_stages: Triton parameters of the forward and dq kernels.
    bwd_block_m, bwd_block_k: tiles of the backward kernels.
    bwd_num_warps, bwd_num_stages: Triton parameters of the backward kernels.
    dkv_splits: query chunks the dk/dv kernel is split over (partial sums
      added by XLA); > 1 balances the long triangular loops of compressed
      attention.
  """

  block_m: int = 128
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 3
  bwd_block_m: int = 64
  bwd_block_k: int = 64
  bwd_num_warps: int = 8
  # One stage: with 2, Triton's pipelining of the dk/dv loop corrupts dk (bf16;
  # dq, dv and the forward are unaffected;
  # experiments/PERF_NOTES.md, "Measurements behind the code's defaults").
  bwd_num_stages: int = 1
  dkv_splits: int = 1

  def for_float32(self) -> "Tiles":
    """Smaller tiles for float32 inputs on the GPU: their 3-pass TF32 dots
    need about twice the shared memory and registers of bf16."""
    return dataclasses.replace(
        self, block_m=64, block_k=32, num_warps=4, num_stages=1,
        bwd_block_m=32, bwd_block_k=32, bwd_num_warps=4, bwd_num_stages=1)

  def __post_init__(self):
    for name in ("block_m", "block_k", "bwd_block_m", "bwd_block_k"):
      value = getattr(self, name)
      if not _util.is_pow2(value) or value < 16:
        raise ValueError(f"Tiles.{name}={value} must be a power of 2 >= 16")
    if self.dkv_splits < 1:
      raise ValueError(f"Tiles.dkv_splits={self.dkv_splits} must be >= 1")


def shared_memory(tiles: Tiles, G: int, Dk: int, Dv: int, itemsize: int) -> dict[str, int]:
  """Estimated shared memory (bytes) of a program of each kernel, counted from the
  kernels below as Triton allocates them: the tiles a program holds, the tiles a loop
  step loads times their buffers (num_stages, and at least 2: Triton double-buffers
  at one stage too), and the probabilities or dS tile each dot takes from registers.
  All in the input dtype; rows of K and V, or of q and dO, as `_util.kv_width`."""
  Gp, Dkp, Dvp = _util.next_pow2(G), _util.next_pow2(Dk, 16), _util.next_pow2(Dv, 16)
  rows = lambda block_m: max(1, block_m // Gp) * Gp
  m, bk = rows(tiles.block_m), tiles.block_k
  mb, bkb = rows(tiles.bwd_block_m), tiles.bwd_block_k
  fwd_bufs, bwd_bufs = max(tiles.num_stages, 2), max(tiles.bwd_num_stages, 2)
  kv = _util.kv_width(Dkp, Dvp, itemsize)   # a K+V or q+dO row
  return {name: itemsize * elements + _util.SCRATCH_BYTES for name, elements in {
      # held + looped x buffers + register operands (the forward's p: none, Hopper's
      # warpgroup MMA takes it from registers)
      "fwd": m * Dkp + fwd_bufs * bk * kv,
      "dq": mb * kv + bwd_bufs * bkb * kv + mb * bkb,
      "dkv": bkb * kv + bwd_bufs * mb * kv + 2 * bkb * mb,
  }.items()}


def fit_tiles(tiles: Tiles, G: int, Dk: int, Dv: int, itemsize: int,
              budget: int) -> Tiles | None:
  """`tiles`, shrunk until every kernel's `shared_memory` fits `budget`: the forward
  first loses pipeline stages (down to 2), then key rows, then query rows; the
  backward key rows, then query rows (16 at least). None when even that does not fit.
  Tiles that fit are returned unchanged."""
  knobs = {"fwd": ("num_stages", "block_k", "block_m"),
           "dq": ("bwd_block_k", "bwd_block_m"), "dkv": ("bwd_block_k", "bwd_block_m")}
  while True:
    over = [k for k, b in shared_memory(tiles, G, Dk, Dv, itemsize).items() if b > budget]
    if not over:
      return tiles
    for name in knobs[over[0]]:
      value, least = getattr(tiles, name), 2 if name == "num_stages" else 16
      if value > least:
        smaller = value - 1 if name == "num_stages" else value // 2
        tiles = dataclasses.replace(tiles, **{name: smaller})
        break
    else:
      return None


def unsupported(q, k, v, tiles: Tiles | None) -> str | None:
  """Why the banded kernels cannot run q, k, v; `tiles` are their default tiles
  after `fit_tiles` (None: none fit)."""
  if why := _util.dtype_unsupported(q.dtype):
    return why
  if tiles is None:
    G, Dk, Dv = q.shape[2] // k.shape[2], q.shape[-1], v.shape[-1]
    least = Tiles(block_m=16, block_k=16, num_stages=2, bwd_block_m=16, bwd_block_k=16)
    need = max(shared_memory(least, G, Dk, Dv, q.dtype.itemsize).values())
    return (f"even 16-row tiles need {need} bytes of shared memory per program for "
            f"Dk={Dk}, Dv={Dv}, G={G}, {q.dtype}; the device has {_util.shared_memory_budget()}")
  return None
