"""Tiles of the selected-attention kernels and the static geometry of one call.

`Tiles` holds what a caller may tune, `Geometry` the sizes every kernel and index
planner of a call reads (padded to the powers of two Triton needs), `default_tiles`
the tiles measured best per dtype and head width, `shared_memory` what each kernel's
tiles take of a GPU's shared memory and `fit_tiles` the tiles shrunk to fit it.
See `wrapper.py`.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _util

NEG = -0.7 * float(jnp.finfo(jnp.float32).max)   # finite "minus infinity"


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes and launch parameters (the figures behind each default:
  experiments/PERF_NOTES.md, "Measurements behind the code's defaults").

  Attributes:
    rows: M, query rows per program of the query tilings (Bq tokens x G heads); a
      power of 2 >= 16. Bq = max(1, rows // G). A tile reads the union of its
      tokens' blocks: a narrow tile (16 rows) reads no block its tokens did not
      choose; a wide one (e.g. 64 rows, with num_warps=4) shares each load among
      more tokens, a win only when neighbouring tokens choose alike.
    dkv_tiles: query tiles per dK/dV program at most; None = one program per
      KV block (bitwise deterministic dK/dV, see `selected_attention`), in
      the block-major backward too (whose chunks are otherwise block_entries).
    num_warps, num_stages: Triton launch parameters of the query tilings' forward
      and dQ kernels. The forward is bound by loading each token's blocks;
      `default_tiles` keeps 2 warps for wider heads and float32 inputs.
    dkv_rows: query rows per step of the dK/dV kernel: it gathers
      max(1, dkv_rows // rows) of the block's query tiles per step (a power
      of 2 >= 16), so that its matmuls, whose inner dimension is the rows,
      are not 16 deep.
    dkv_num_warps: warps of the dK/dV kernel, which holds two [l', D] float32
      accumulators and the block's K and V.
    block_major: run the *block-major* kernels (see `selected_attention`):
      None = where they are expected to be faster and their transient buffers
      fit the device's memory, fixed by the shapes at trace time
      (`choice.tiling`); True = always; False = never (query tiles).
    block_rows: query rows per step of the block-major forward (a power of
      2 >= 16: block_rows // G (token, block) entries of G heads each; its
      backward steps take dkv_rows rows).
    block_entries: (token, block) entries per block-major program at most
      (the forced initial block is chosen by all T tokens: chunks balance it).
    block_fwd_num_warps: warps of the block-major forward.
    block_dq_float32: the block-major backward stores each entry's dQ term in
      float32 instead of the input dtype (n terms per query row, summed in XLA
      in float32 either way): twice the bytes written and read back, for dQ
      terms without a rounding each. float32 inputs store float32 regardless.
    block_pass_bytes: the block-major kernels' transient buffers (`choice.block_major_bytes`)
      of one pass at most: the (batch row, KV head) pairs run in passes of as many as
      fit, at least one (`choice.in_passes`).
  """

  rows: int = 16
  dkv_tiles: int | None = 256
  dkv_rows: int = 128
  num_warps: int = 1
  num_stages: int = 2
  dkv_num_warps: int = 8
  block_major: bool | None = None
  block_rows: int = 64
  block_entries: int = 256
  block_fwd_num_warps: int = 4
  block_dq_float32: bool = False
  block_pass_bytes: int = 1 << 30

  def __post_init__(self):
    rows_ok = lambda x: isinstance(x, int) and x >= 16 and _util.is_pow2(x)
    if not rows_ok(self.rows):
      raise ValueError(f"Tiles.rows={self.rows!r} must be a power of 2 >= 16")
    if self.dkv_tiles is not None and (
        not isinstance(self.dkv_tiles, int) or self.dkv_tiles < 1):
      raise ValueError(f"Tiles.dkv_tiles={self.dkv_tiles!r} must be None or an int >= 1")
    if not rows_ok(self.dkv_rows):
      raise ValueError(f"Tiles.dkv_rows={self.dkv_rows!r} must be a power of 2 >= 16")
    if not rows_ok(self.block_rows):
      raise ValueError(f"Tiles.block_rows={self.block_rows!r} must be a power of 2 >= 16")
    if self.block_major not in (None, True, False):
      raise ValueError(f"Tiles.block_major={self.block_major!r} must be None, True or False")
    if self.block_dq_float32 not in (True, False):
      raise ValueError(f"Tiles.block_dq_float32={self.block_dq_float32!r} must be True or False")
    if not isinstance(self.block_entries, int) or self.block_entries < 1:
      raise ValueError(f"Tiles.block_entries={self.block_entries!r} must be an int >= 1")
    if not isinstance(self.block_pass_bytes, int) or self.block_pass_bytes < 1:
      raise ValueError(f"Tiles.block_pass_bytes={self.block_pass_bytes!r} must be an int >= 1")
    for name in ("num_warps", "dkv_num_warps", "block_fwd_num_warps"):
      value = getattr(self, name)
      if not isinstance(value, int) or not _util.is_pow2(value):
        raise ValueError(f"Tiles.{name}={value!r} must be a power of 2")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"Tiles.num_stages={self.num_stages!r} must be an int >= 1")


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static sizes of one call; `*p` are padded sizes."""

  B: int         # batch rows (of one pass: `choice.in_passes`)
  T: int         # queries
  S: int         # keys (T, or more for a slice of the queries: `q_offset`)
  HKV: int       # KV heads (of one pass)
  G: int
  Dk: int
  Dv: int
  lp: int        # l', tokens per selection block
  Gp: int
  Dkp: int
  Dvp: int
  Lb: int        # keys loaded per block: l' rounded up to a power of 2 >= 16
  n_pad: int     # n rounded up to a power of 2
  Bq: int        # tokens per query tile
  nT: int        # query tiles
  nb: int        # selection blocks covering the S keys
  U: int         # capacity of a tile's block union
  scale: float
  interpret: bool
  tiles: Tiles

  @property
  def M(self) -> int:
    return self.Bq * self.Gp

  @property
  def R(self) -> int:     # query tiles gathered per dK/dV step
    return max(1, self.tiles.dkv_rows // self.M)

  @property
  def C(self) -> int:     # (token, block) entries per block-major forward step
    return max(1, self.tiles.block_rows // self.Gp)

  @property
  def C_bwd(self) -> int:  # (token, block) entries per block-major dK/dV step
    return max(1, self.tiles.dkv_rows // self.Gp)

  @property
  def Tq(self) -> int:    # padded query length
    return self.nT * self.Bq

  @property
  def Tk(self) -> int:    # padded key length: every block load stays in bounds
    return self.nb * self.lp + self.Lb - self.lp

  @classmethod
  def make(cls, q, v, block_idx, block: int, scale, interpret, tiles):
    B, T, HQ, Dk = q.shape
    S, HKV, n, Dv = v.shape[1], block_idx.shape[2], block_idx.shape[3], v.shape[-1]
    G, lp = HQ // HKV, block
    Gp, n_pad = _util.next_pow2(G), _util.next_pow2(n)
    Bq = max(1, tiles.rows // Gp)
    nT, nb = -(-T // Bq), -(-S // lp)
    return cls(B=B, T=T, S=S, HKV=HKV, G=G, Dk=Dk, Dv=Dv, lp=lp, Gp=Gp,
               Dkp=_util.next_pow2(Dk, 16), Dvp=_util.next_pow2(Dv, 16),
               Lb=_util.next_pow2(lp, 16), n_pad=n_pad,
               Bq=Bq, nT=nT, nb=nb, U=min(Bq * n_pad, nb), scale=float(scale),
               interpret=bool(interpret), tiles=tiles)

  def params(self, num_warps=None, num_stages=None):
    return plgpu.CompilerParams(num_warps=num_warps or self.tiles.num_warps,
                                num_stages=num_stages or self.tiles.num_stages)


def dq_dtype(tiles: Tiles, dtype) -> jnp.dtype:
  """dtype of the block-major backward's per-entry dQ terms for inputs of `dtype`: the
  inputs', or float32 (`Tiles.block_dq_float32`)."""
  return jnp.dtype(jnp.float32 if tiles.block_dq_float32 else dtype)


def default_tiles(q, v) -> Tiles:
  """`Tiles()` where it was measured fastest (16-bit inputs, head dims <= 128), else
  the narrow tile on 2 warps (a single warp's [16, 256] tiles hold twice the
  registers), and for 4-byte inputs 64 dK/dV rows per step and, with a head dim over
  128, a single stage (experiments/PERF_NOTES.md, "Measurements behind the code's defaults")."""
  wide_heads = max(q.shape[-1], v.shape[-1]) > 128
  if q.dtype.itemsize < 4:
    return Tiles(num_warps=2) if wide_heads else Tiles()
  return Tiles(dkv_rows=64, num_warps=2, num_stages=1 if wide_heads else 2)


# Which Tiles field sets the rows of each kernel's tiles, shrunk by `fit_tiles`, and
# the fewest rows it may take: Triton's allocation for dK/dV steps of 16 gathered rows
# exceeds the estimate (float32, 256-wide heads: 245,760 bytes for 208,896;
# experiments/shared_memory.py), so those steps keep 32 rows at least.
ROWS_OF = {"fwd": "rows", "dq": "rows", "dkv": "dkv_rows",
           "block_fwd": "block_rows", "block_dkv": "dkv_rows"}
FEWEST_ROWS = {"rows": 16, "dkv_rows": 32, "block_rows": 16}


def shared_memory(tiles: Tiles, G: int, Dk: int, Dv: int, block: int,
                  itemsize: int) -> dict[str, int]:
  """Estimated shared memory (bytes) of a program of each kernel, counted from
  `kernels.py` as Triton allocates them (checked against Triton's own
  allocation for sm90 by experiments/shared_memory.py):

  - fwd / dQ (query tiles of M rows): q (and dO) held, each block's K and V loaded per
    step, the probabilities (or dS) a dot takes from registers. Triton keeps
    num_stages copies of a step's K and V for dots of >= 64 rows (Hopper's
    warpgroup MMA) and one for narrower ones;
  - dK/dV over query tiles: the block's K and V held, R gathered q and dO rows a step
    (one copy: Triton does not pipeline these gathers), p^T and dS^T from registers;
  - block-major forward: K and V held, two copies of the gathered q rows (prefetch);
  - block-major dK/dV: as over query tiles, but the gathers take max(num_stages, 2)
    copies, and dS also feeds the dQ dot.
  Rows of K and V, or of q and dO, count `_util.kv_width` elements.
  """
  Gp, Lb = _util.next_pow2(G), _util.next_pow2(block, 16)
  Dkp, Dvp = _util.next_pow2(Dk, 16), _util.next_pow2(Dv, 16)
  D, stages = _util.kv_width(Dkp, Dvp, itemsize), max(tiles.num_stages, 2)   # a K+V or q+dO row
  m, r, rb = (max(x, Gp) for x in (tiles.rows, tiles.dkv_rows, tiles.block_rows))
  kv = Lb * D * (tiles.num_stages if m >= 64 else 1)
  return {name: itemsize * elements + _util.SCRATCH_BYTES for name, elements in {
      "fwd": m * Dkp + kv + m * Lb,
      "dq": m * D + kv + m * Lb,
      "dkv": Lb * D + r * D + 2 * Lb * r,
      "block_fwd": Lb * D + 2 * rb * Dkp + rb * Lb,
      "block_dkv": Lb * D + stages * r * D + 2 * Lb * r,
  }.items()}


def fit_tiles(tiles: Tiles, kernels: tuple[str, ...], G: int, Dk: int, Dv: int,
              block: int, itemsize: int, budget: int) -> Tiles | None:
  """`tiles` with the rows of each of `kernels` over `budget` halved until its
  `shared_memory` fits (`ROWS_OF`, down to `FEWEST_ROWS`); None where the fewest do
  not fit. Tiles that fit are returned unchanged."""
  while True:
    need = shared_memory(tiles, G, Dk, Dv, block, itemsize)
    over = [name for name in kernels if need[name] > budget]
    if not over:
      return tiles
    field = ROWS_OF[over[0]]
    if getattr(tiles, field) // 2 < FEWEST_ROWS[field]:
      return None
    tiles = dataclasses.replace(tiles, **{field: getattr(tiles, field) // 2})
