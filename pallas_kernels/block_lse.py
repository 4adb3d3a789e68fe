"""Per-block log-sum-exp of causal attention logits: the teacher of the selection
distillation (docs/selection_learning.md#selection-distillation; reference: `block_lse_xla` in
`nsa_jax/ops/distill.py`; design: docs/kernels.md#block-lse-kernel).

    out[b, r, h, j] = log sum_k exp(scale * q[b, r, h] . k[b, k, h // G])

over the keys k of block j ([j*block, (j+1)*block)) that query row r sees: k <= pos[r],
k < T and, for packed rows, k >= doc_start[b, r]; -inf where it sees none. One program per
(query tile, head, batch row) walks the tile's visible blocks once and writes one value per
row and block: the [T, T] logits never reach memory. No custom_vjp: the teacher carries no
gradient (its caller stops it).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _util


@dataclasses.dataclass(frozen=True)
class Tiles:
  """block_q: query rows per program, a power of 2 >= 16 (shrunk for short inputs);
  num_warps, num_stages: Triton launch parameters."""

  block_q: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    if not _util.is_pow2(self.block_q) or self.block_q < 16:
      raise ValueError(f"Tiles.block_q={self.block_q!r} must be a power of 2 >= 16")
    if not _util.is_pow2(self.num_warps):
      raise ValueError(f"Tiles.num_warps={self.num_warps!r} must be a power of 2")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"Tiles.num_stages={self.num_stages!r} must be an int >= 1")


def _kernel(q_ref, k_ref, pos_ref, *refs, scale: float, block: int, seq_len: int,
            num_blocks: int, interpret: bool):
  """One (query tile, head, batch row) program. refs: q_ref [Bq, Dk'] (the tile's rows of
  this head), k_ref [rows, Dk'] (its KV group's keys, padded), pos_ref [Bq], then start_ref
  [Bq] (packed rows) and o_ref [num_blocks, Bq]."""
  *start_ref, o_ref = refs
  tile_k = _util.next_pow2(block, 16)
  t = pos_ref[...]
  doc = start_ref[0][...] if start_ref else jnp.zeros_like(t)
  lo = _util.div(jnp.min(doc), block)
  hi = _util.div(jnp.minimum(jnp.max(t), seq_len - 1), block) + 1    # blocks [lo, hi)
  none = jnp.full(t.shape, -jnp.inf, jnp.float32)

  def fill(j, carry):
    o_ref[j, :] = none
    return carry

  def body(j, carry):
    key = j * block + jnp.arange(tile_k, dtype=jnp.int32)
    seen = ((key[None, :] <= t[:, None]) & (key[None, :] >= doc[:, None])
            & (key[None, :] < jnp.minimum(seq_len, (j + 1) * block)))
    s = sum(_util.dot(q_ref[:, pl.ds(start, size)],
                      k_ref[pl.ds(j * block, tile_k), pl.ds(start, size)],
                      interpret=interpret, contract=(1, 1))
            for start, size in _util.pow2_parts(q_ref.shape[-1])) * scale
    s = jnp.where(seen, s, -jnp.inf)
    m = jnp.max(s, axis=1)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    o_ref[j, :] = m + jnp.log(jnp.sum(jnp.exp(s - m[:, None]), axis=1))   # log 0: -inf
    return carry

  lax.fori_loop(0, lo, fill, 0)
  lax.fori_loop(lo, hi, body, 0)
  lax.fori_loop(hi, num_blocks, fill, 0)


def shared_memory(tiles: Tiles, block: int, Dk: int, itemsize: int) -> int:
  """Estimated shared memory (bytes) of a program, counted as Triton allocates it for
  sm90 (docs/kernels.md#shared-memory): the query tile is loaded in the block loop, so
  each of `num_stages` buffers holds a query tile and a key tile; float32 stages its TF32
  operands in one more query tile. Dk padded to 16."""
  dk = _util.cdiv(Dk, 16) * 16
  tile_k = _util.next_pow2(block, 16)
  rows = (tiles.num_stages * (tiles.block_q + tile_k)
          + (tiles.block_q if itemsize == 4 else 0))
  return itemsize * dk * rows + _util.SCRATCH_BYTES


def default_tiles(q, block: int) -> Tiles | None:
  """`Tiles()` with its query rows halved (16 at least), then its stages, until
  `shared_memory` fits the device; None where nothing fits."""
  itemsize = jnp.dtype(q.dtype).itemsize
  return _util.fit_tiles(Tiles(), lambda t: shared_memory(t, block, q.shape[-1], itemsize),
                         (("block_q", 16), ("num_stages", 1)))


def unsupported(q, k, *, block: int) -> str | None:
  """Why the kernel cannot take these (validated) inputs, or None."""
  if why := _util.dtype_unsupported(q.dtype):
    return why
  if default_tiles(q, block) is None:
    need = shared_memory(Tiles(16, num_stages=1), block, q.shape[-1], q.dtype.itemsize)
    return (f"a 16-row tile needs {need} bytes of shared memory for Dk={q.shape[-1]}, "
            f"{q.dtype}; the device has {_util.shared_memory_budget()}")
  return None


@functools.partial(jax.jit, static_argnames=("block", "scale", "interpret", "tiles"))
def block_lse(q, k, positions, *, block: int, scale: float, interpret: bool,
              tiles: Tiles | None = None, doc_start=None):
  """Per-block lse of causal attention logits (module docstring).

  Args:
    q: [B, R, HQ, Dk] query rows at `positions` [R] int32 (any order, >= T allowed: such a
      row sees keys up to T - 1); k: [B, T, HKV, Dk], HQ a multiple of HKV.
    block: keys per block; scale: logit scale (a python float).
    interpret: Pallas interpret mode (CPU). tiles: default `default_tiles`.
    doc_start: optional [B, R] int, each row's first visible key (packed rows).

  Returns:
    [B, R, HQ, ceil(T / block)] float32.
  """
  tiles = default_tiles(q, block) if tiles is None else tiles
  B, R, HQ, Dk = q.shape
  T, HKV = k.shape[1], k.shape[2]
  G = HQ // HKV
  num_blocks = pl.cdiv(T, block)
  block_q = min(tiles.block_q, _util.next_pow2(R, 16))
  num_tiles = pl.cdiv(R, block_q)
  rows = (num_blocks - 1) * block + _util.next_pow2(block, 16)
  dk = pl.cdiv(Dk, 16) * 16
  q = _util.pad_to(q, (B, num_tiles * block_q, HQ, dk))
  k = _util.pad_to(k, (B, rows, HKV, dk))
  # Padded rows repeat the last row's position and document: finite, dropped below.
  pad_rows = lambda x: jnp.pad(x.astype(jnp.int32), [(0, 0)] * (x.ndim - 1)
                               + [(0, num_tiles * block_q - R)], mode="edge")
  inputs = [q, k, pad_rows(positions)]
  in_specs = [pl.BlockSpec((None, block_q, None, dk), lambda i, h, b: (b, i, h, 0)),
              pl.BlockSpec((None, rows, None, dk), lambda i, h, b: (b, 0, h // G, 0)),
              pl.BlockSpec((block_q,), lambda i, h, b: (i,))]
  if doc_start is not None:
    inputs.append(pad_rows(doc_start))
    in_specs.append(pl.BlockSpec((None, block_q), lambda i, h, b: (b, i)))
  out = pl.pallas_call(
      functools.partial(_kernel, scale=scale, block=block, seq_len=T,
                        num_blocks=num_blocks, interpret=interpret),
      grid=(num_tiles, HQ, B),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, num_blocks, block_q), lambda i, h, b: (b, h, 0, i)),
      out_shape=jax.ShapeDtypeStruct((B, HQ, num_blocks, num_tiles * block_q), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret,
      name="nsa_block_lse",
  )(*inputs)
  return jnp.transpose(out, (0, 3, 1, 2))[:, :R]
