"""Selected-block attention in Pallas (Triton lowering), forward and backward.

NSA paper (arXiv 2502.11089) §3.3.2, Eq. 10-12 (attention over the selected
blocks) and §3.4 "Kernel Design" (group-centric loading); SPEC §3 "Selected
attention". Reference: `nsa_jax.ops.selected.selected_attention_xla`.

Forward. One program takes a *query tile*: `Bq` consecutive tokens of one KV
group, with all G query heads of the group, i.e. M = Bq * G rows (paper §3.4:
all heads of a group share one selection, so they share every K/V load). It
loops over the *union* of the blocks its Bq tokens selected (built in XLA by
sorting and de-duplicating the tile's Bq * n indices) and masks, per row, the
blocks that row's token did not select and the keys after it (causality). A
block wanted by several neighbouring tokens is thus read once per tile, not
once per token. Softmax is online, in float32, in base 2.

Tile width: a narrow tile (16 rows: one token when G = 16) reads no block
its token did not choose; a wide one (64 rows) shares each load among more
tokens but reads the union of their choices. Which wins depends on how alike
neighbouring tokens choose, so both are compiled and one is picked per call
from block_idx (`Tiles.wide_rows`, `tilings`).

Backward (recomputes p from the saved log-sum-exp):
- dQ: the forward's access pattern, per query tile.
- dK/dV: an inverted index. For every KV block, the query tiles whose union
  holds it (a stable sort in XLA), cut into chunks of at most
  `Tiles.dkv_tiles` tiles; one program per chunk accumulates the block's dK
  and dV in registers and adds them into a float32 buffer with atomics. Each
  step gathers several listed tiles at once (`Tiles.dkv_rows` rows: eight
  narrow tiles), so that the dK/dV matmuls, whose inner dimension is the
  number of query rows, are not 16 deep.
  Chunking bounds the work of one program: every tile selects block 0 (the
  forced initial block), so its list is T / Bq tiles long. Determinism: with
  `dkv_tiles=None` each block is one chunk, so every element of dK/dV receives
  one atomic add of its value onto zero (besides exact adds of 0.0 from the
  padded rows of a neighbouring block when l' < 16), and the result is
  bitwise deterministic.
  With chunks, blocks whose list is longer than `dkv_tiles` (the forced
  initial block, popular blocks) receive one add per chunk in an unspecified
  order: float32 rounding may differ from run to run. This is the default,
  for load balance; pass `Tiles(dkv_tiles=None)` for reproducible gradients.

Block-major kernels (`Tiles.block_major`; by default chosen per call among
them and the two query tilings by estimated cost, `tilings`). A query tile
loads each of its tokens' n blocks, i.e. n * l' * (Dk + Dv) elements per
token and group, to serve G heads: with small G, or tokens that select
unlike blocks, K/V traffic (from L2) bounds it. The block-major kernels turn
the loop around: one program per KV block (or a chunk of its list) loads the
block once and walks the *entries* (token, slot) whose slot selected it (an
inverted index sorted in XLA, `_entry_index`), gathering C = rows // G
entries' G query rows a step:
- forward: each entry's attention over its one block, normalised, and its
  log-sum-exp, stored per entry; XLA merges the n entries of a token
  (`_merge`). Memory: n times the output (q.dtype) and its lse, transient.
- backward: the dK/dV kernel over entries instead of query tiles, which also
  stores each entry's dQ term (float32, n times dQ, transient); XLA sums them.
  No dQ kernel, and no atomics for dQ: every entry's slot is written once.
  dK/dV are added per chunk of `Tiles.block_entries` entries, in any order;
  with dkv_tiles=None each block is one program, and dK/dV (and dQ, whose
  terms are plain stores summed in XLA) are bitwise reproducible, as above.
Traffic per entry: G query rows in, G output rows out, instead of a block of
l' keys and values in: a win when G is small and neighbouring tokens choose
unlike blocks (H200, 64k, random q, fwd+bwd: G = 1 505 -> 111 ms, G = 4
177 -> 75), a loss at G = 16 (55 -> 62 ms) or when neighbours choose alike
(time-smoothed q, G = 4: 65 -> 75 ms), where wide query tiles share loads.

Inputs are padded in XLA where the kernels need powers of two: the group size
G, the head dims (>= 16), n, and T (to whole tiles and blocks). The padding is
a no-op for the paper's shapes with T a multiple of 64 and Dk = Dv = 128.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nsa_jax.config import NSAConfig

LOG2E = math.log2(math.e)
NEG = -0.7 * float(jnp.finfo(jnp.float32).max)   # finite "minus infinity"
INT32_MAX = int(jnp.iinfo(jnp.int32).max)


def _pow2(x: int, least: int = 1) -> int:
  """Smallest power of two >= max(x, least)."""
  return max(least, 1 << max(0, x - 1).bit_length())


def _is_pow2(x: int) -> bool:
  return x >= 1 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes and launch parameters.

  Attributes:
    rows: M, query rows per program (Bq tokens x G heads); a power of 2 >= 16.
      Bq = max(1, rows // G).
    wide_rows: rows of the alternative wide tile, or None. A tile reads the
      union of its tokens' blocks: when neighbouring tokens select alike (as
      expected of trained models; not yet measured here), a wide tile shares
      each load among more tokens and runs larger matmuls; when they do not
      (random inputs), the union grows nearly Bq-fold and the wide tile
      wastes that much work. So both tilings (and the block-major kernels,
      see block_major) are compiled and `lax.switch` picks one per call from
      block_idx by estimated cost (`tilings`). Measured (H200, T = 64k,
      G = 16, bf16 fwd): random queries 18.5 ms at 16 rows vs 27.3 ms at 64;
      time-smoothed queries 18.4 ms vs 11.3 ms. Cost: every tiling compiles
      (the choice costs a sort of a sample of tiles per tiling, and only the
      chosen tiling plans all its tiles); None = narrow tiles only.
    dkv_tiles: query tiles per dK/dV program at most; None = one program per
      KV block (bitwise deterministic dK/dV, see the module docstring), in
      the block-major backward too (whose chunks are otherwise block_entries).
      256: fwd+bwd 88.6 ms vs 91.1 ms at 64 (H200, T = 64k, G = 16, 16-row
      tiles).
    num_warps, num_stages: Triton launch parameters of the forward and dQ
      kernels (H200, 64k, G = 16, random q, 16-row tiles, fwd / fwd+bwd:
      1 warp 16.7 / 53.5 ms, 2 warps 18.0 / 55.0; an earlier run: 2 warps
      17.6 / 54.0, 4 warps 18.8 / 57.0, 8 warps 27.0 / 72.1). The forward
      is bound by loading each token's blocks: a kernel that only loads them
      takes 14.9 ms at its best (8 warps), 17.3 ms at 2 warps. `default_tiles`
      keeps 2 warps for wider heads and float32 inputs.
    wide_num_warps: num_warps of the wide tiling (64 rows; 4 was measured).
    dkv_rows: query rows per step of the dK/dV kernel: it gathers
      max(1, dkv_rows // rows) of the block's query tiles per step (a power
      of 2 >= 16). H200, T = 64k, G = 16, random q, fwd+bwd: 16 rows (one
      tile per step) 88.8 ms, 32: 73.8, 64: 65.3, 128: 56.6.
    dkv_num_warps: warps of the dK/dV kernel, which holds two [l', D] float32
      accumulators and the block's K and V (8 warps: no register spills at
      l' = 64, D = 128).
    block_major: run the *block-major* kernels (see the module docstring):
      None = where they are expected to be faster and their transient
      buffers fit BLOCK_MAJOR_MEMORY_SHARE of the device's memory, chosen
      per call among the narrow, wide and block-major tilings (`tilings`);
      True = always; False = never (query tiles only).
    block_rows: query rows per step of the block-major forward (a power of
      2 >= 16: block_rows // G (token, block) entries of G heads each; its
      backward steps take dkv_rows rows).
    block_entries: (token, block) entries per block-major program at most
      (the forced initial block is chosen by all T tokens: chunks balance it).
    block_fwd_num_warps: warps of the block-major forward.
  """

  rows: int = 16
  wide_rows: int | None = 64
  dkv_tiles: int | None = 256
  dkv_rows: int = 128
  num_warps: int = 1
  wide_num_warps: int = 4
  num_stages: int = 2
  dkv_num_warps: int = 8
  block_major: bool | None = None
  block_rows: int = 64
  block_entries: int = 256
  block_fwd_num_warps: int = 4

  def __post_init__(self):
    rows_ok = lambda x: isinstance(x, int) and x >= 16 and _is_pow2(x)
    if not rows_ok(self.rows):
      raise ValueError(f"Tiles.rows={self.rows!r} must be a power of 2 >= 16")
    if self.wide_rows is not None and (not isinstance(self.wide_rows, int)
                                       or self.wide_rows <= self.rows
                                       or not _is_pow2(self.wide_rows)):
      raise ValueError(f"Tiles.wide_rows={self.wide_rows!r} must be None or a power of 2 "
                       f"> rows={self.rows}")
    if self.dkv_tiles is not None and (
        not isinstance(self.dkv_tiles, int) or self.dkv_tiles < 1):
      raise ValueError(f"Tiles.dkv_tiles={self.dkv_tiles!r} must be None or an int >= 1")
    if not rows_ok(self.dkv_rows):
      raise ValueError(f"Tiles.dkv_rows={self.dkv_rows!r} must be a power of 2 >= 16")
    if not rows_ok(self.block_rows):
      raise ValueError(f"Tiles.block_rows={self.block_rows!r} must be a power of 2 >= 16")
    if self.block_major not in (None, True, False):
      raise ValueError(f"Tiles.block_major={self.block_major!r} must be None, True or False")
    if not isinstance(self.block_entries, int) or self.block_entries < 1:
      raise ValueError(f"Tiles.block_entries={self.block_entries!r} must be an int >= 1")
    for name in ("num_warps", "wide_num_warps", "dkv_num_warps", "block_fwd_num_warps"):
      value = getattr(self, name)
      if not isinstance(value, int) or not _is_pow2(value):
        raise ValueError(f"Tiles.{name}={value!r} must be a power of 2")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"Tiles.num_stages={self.num_stages!r} must be an int >= 1")


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static sizes of one call; `*p` are padded sizes."""

  B: int
  T: int
  HKV: int
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
  nb: int        # selection blocks covering T
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
  def make(cls, q, v, block_idx, config: NSAConfig, scale, interpret, tiles):
    B, T, HQ, Dk = q.shape
    HKV, n, Dv = block_idx.shape[2], block_idx.shape[3], v.shape[-1]
    G, lp = HQ // HKV, config.select_block
    Gp, n_pad = _pow2(G), _pow2(n)
    Bq = max(1, tiles.rows // Gp)
    nT, nb = -(-T // Bq), -(-T // lp)
    return cls(B=B, T=T, HKV=HKV, G=G, Dk=Dk, Dv=Dv, lp=lp, Gp=Gp,
               Dkp=_pow2(Dk, 16), Dvp=_pow2(Dv, 16), Lb=_pow2(lp, 16), n_pad=n_pad,
               Bq=Bq, nT=nT, nb=nb, U=min(Bq * n_pad, nb), scale=float(scale),
               interpret=bool(interpret), tiles=tiles)

  def params(self, num_warps=None, num_stages=None):
    return plgpu.CompilerParams(num_warps=num_warps or self.tiles.num_warps,
                                num_stages=num_stages or self.tiles.num_stages)


def _pad(x, shape, value=0):
  """Pads x at the end of each axis up to `shape` (no copy when it fits)."""
  if x.shape == tuple(shape):
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)],
                 constant_values=value)


# ----------------------------------------------------------------- XLA side


def _distinct(blk, geo: _Geometry):
  """Each query tile's selected blocks, sorted, and which of them count.

  blk [B, Bq * k, HKV, n_pad] (-1 = empty; k tiles) -> x [B, HKV, k, Bq * n_pad]
  and keep (bool, same shape): a block in range (< nb; the reference ignores
  the others too: no visible key), not a repeat of the one before.
  """
  x = blk.reshape(geo.B, -1, geo.Bq, geo.HKV, geo.n_pad)
  x = jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(geo.B, geo.HKV, x.shape[1], -1)
  x = jnp.sort(x, axis=-1)
  repeat = jnp.concatenate(
      [jnp.zeros_like(x[..., :1], dtype=bool), x[..., 1:] == x[..., :-1]], -1)
  return x, (x >= 0) & (x < geo.nb) & ~repeat


def _tile_unions(blk, geo: _Geometry):
  """Sorted union of each query tile's selected blocks.

  blk [B, Tq, HKV, n_pad] -> union [B, HKV, nT, U] int32 (valid entries
  first, ascending) and count [B, HKV, nT, 1].
  """
  x, keep = _distinct(blk, geo)
  union = jnp.sort(jnp.where(keep, x, INT32_MAX), axis=-1)[..., :geo.U]
  count = jnp.sum(keep, axis=-1, dtype=jnp.int32)[..., None]
  return union, count


def _blocks_per_token(blk, geo: _Geometry):
  """Estimated blocks a query tiling reads per token and KV head: the mean
  union of SAMPLED_TILES evenly spaced tiles per (sequence, head), over Bq.
  (A sample, as the unions of all tiles cost sorts of Bq * n indices per tile:
  ~10 ms for two tilings at 64k, G = 1, when only one runs.)"""
  stride = max(1, geo.nT // SAMPLED_TILES)
  tiles = blk.reshape(geo.B, geo.nT, geo.Bq, geo.HKV, geo.n_pad)[:, ::stride]
  _, keep = _distinct(tiles.reshape(geo.B, -1, geo.HKV, geo.n_pad), geo)
  return jnp.mean(jnp.sum(keep, axis=-1, dtype=jnp.float32)) / geo.Bq


def _work_items(j, ids, nb: int, chunk: int):
  """Groups work by KV block: the inverted index of the kernels that run one
  program per KV block (dK/dV, block-major forward).

  j [Z, E]: the block each of E work pieces (per head z) needs, nb = none;
  ids [Z, E]: what the kernel reads for each piece. Returns ids sorted by
  block, stably ([Z, E]), and items [Z, W, 4]: (block, lo, hi, 0) meaning
  "block, ids[lo:hi]", at most `chunk` ids each; unused items have lo = hi = 0.
  """
  Z, E = j.shape
  W = nb + -(-E // chunk)    # sum_j ceil(len_j / chunk) <= E / chunk + nb
  j, ids = lax.sort((j, ids), dimension=1, num_keys=1, is_stable=True)

  def items_of(js):
    starts = jnp.searchsorted(js, jnp.arange(nb + 1, dtype=jnp.int32)).astype(jnp.int32)
    n_chunks = -(-(starts[1:] - starts[:-1]) // chunk)
    ends = jnp.cumsum(n_chunks)
    w = jnp.arange(W, dtype=jnp.int32)
    jw = jnp.searchsorted(ends, w, side="right").astype(jnp.int32)
    used = jw < nb
    jw = jnp.minimum(jw, nb - 1)
    lo = starts[jw] + (w - (ends[jw] - n_chunks[jw])) * chunk
    hi = jnp.minimum(lo + chunk, starts[jw + 1])
    zero = jnp.zeros_like(w)
    return jnp.stack([jnp.where(used, jw, zero), jnp.where(used, lo, zero),
                      jnp.where(used, hi, zero), zero], axis=-1)

  return ids, jax.vmap(items_of)(j)


def _inverted_index(union, count, geo: _Geometry):
  """For each KV block, the query tiles whose union holds it (dK/dV work items).

  Returns tiles [B, HKV, nT*U] (tile ids sorted by block) and items
  [B, HKV, W, 4] (`_work_items`, chunks of `Tiles.dkv_tiles` tiles).
  """
  B, HKV, nT, U, nb = geo.B, geo.HKV, geo.nT, geo.U, geo.nb
  valid = jnp.arange(U, dtype=jnp.int32).reshape(1, 1, 1, U) < count
  j = jnp.where(valid, union, nb).reshape(B * HKV, nT * U)
  i = jnp.broadcast_to(jnp.arange(nT, dtype=jnp.int32)[:, None], (nT, U))
  i = jnp.broadcast_to(i.reshape(1, nT * U), (B * HKV, nT * U))
  tiles, items = _work_items(j, i, nb, geo.tiles.dkv_tiles or nT)
  return tiles.reshape(B, HKV, -1), items.reshape(B, HKV, -1, 4)


def _listed(blk, geo: _Geometry):
  """[B, Tq, HKV, n_pad] bool: the (token, slot) entries the block-major
  forward computes: a block in range that is not after its token (the
  reference sees no key in the others)."""
  t = jnp.arange(geo.Tq, dtype=jnp.int32).reshape(1, geo.Tq, 1, 1)
  return (blk >= 0) & (blk * geo.lp <= t)


def _entry_index(blk, geo: _Geometry, chunk: int | None):
  """For each KV block, the (token, slot) entries that selected it.

  Returns entries [B, HKV, Tq*n_pad] (entry e = token * n_pad + slot, sorted
  by block) and items [B, HKV, W, 4] (`_work_items`, chunks of `chunk`
  entries; None = one item per block).
  """
  B, HKV, E = geo.B, geo.HKV, geo.Tq * geo.n_pad
  j = jnp.where(_listed(blk, geo), blk, geo.nb)
  j = jnp.transpose(j, (0, 2, 1, 3)).reshape(B * HKV, E)
  e = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32)[None, :], (B * HKV, E))
  entries, items = _work_items(j, e, geo.nb, chunk or E)
  return entries.reshape(B, HKV, E), items.reshape(B, HKV, -1, 4)


def _slots(part, blk, geo: _Geometry, fill=0.0):
  """[B, Tq*n_pad, HKV, Gp, ...] per-entry results -> [B, Tq, n_pad, HKV, Gp, ...],
  `fill` in the slots not listed (never written by the kernels)."""
  x = part.reshape(geo.B, geo.Tq, geo.n_pad, *part.shape[2:])
  listed = _slot_mask(blk, geo)
  return jnp.where(listed.reshape(listed.shape + (1,) * (x.ndim - listed.ndim)), x, fill)


def _slot_mask(blk, geo: _Geometry):
  """[B, Tq, n_pad, HKV, 1]: `_listed` in the layout of `_slots`."""
  return jnp.transpose(_listed(blk, geo), (0, 1, 3, 2))[..., None]


def _merge(o_part, lse_part, blk, geo: _Geometry):
  """Combines the block-major forward's per-entry results into o and lse.

  o_part [B, Tq*n_pad, HKV, Gp, Dvp], lse_part [B, Tq*n_pad, HKV, Gp]: each
  listed entry's attention over its one block (normalised) and base-2
  log-sum-exp. o = sum_k 2^(lse_k - lse) o_k with lse = log2 sum_k 2^lse_k
  (Eq. 10 over the union of the blocks). Rows that see nothing get o = 0 and
  lse = 0, as in the query-tile forward.
  """
  listed = _slot_mask(blk, geo)
  lse_k = _slots(lse_part, blk, geo, NEG)                        # [B, Tq, n, HKV, Gp]
  m = jnp.max(lse_k, axis=2)
  w = jnp.where(listed, jnp.exp2(lse_k - m[:, :, None]), 0.0)
  l = jnp.sum(w, axis=2)                                         # [B, Tq, HKV, Gp]
  o = jnp.sum(w[..., None] * _slots(o_part, blk, geo).astype(jnp.float32), axis=2)
  seen = l > 0
  o = o / jnp.where(seen, l, 1.0)[..., None]
  return o.astype(o_part.dtype), jnp.where(seen, m + jnp.log2(l), 0.0)


# ------------------------------------------------------------- kernel side


def _tokens(i, geo: _Geometry):
  """Token positions [Bq] of query tile i."""
  return i * geo.Bq + jnp.arange(geo.Bq, dtype=jnp.int32)


def _rows(blk, tok, geo: _Geometry):
  """Token position [N*Gp] and selected blocks [N*Gp, n_pad] of the rows of N tokens.

  tok [N] are the tokens, blk [N, n_pad] their selections; row r is token
  tok[r // Gp], head r % Gp (the tokens' [N, Gp] heads flattened).
  """
  N = tok.shape[0]
  sel = jnp.broadcast_to(blk[:, None, :], (N, geo.Gp, geo.n_pad))
  return _token_rows(tok, geo), sel.reshape(N * geo.Gp, geo.n_pad)


def _token_rows(tok, geo: _Geometry):
  """Token position [N*Gp] of the rows of N tokens tok [N] (row r: tok[r // Gp])."""
  return jnp.broadcast_to(tok[:, None], (tok.shape[0], geo.Gp)).reshape(-1)


def _scores(q, k, j, tok, sel, geo: _Geometry):
  """Base-2 logits [M, Lb] of the rows against block j, and their visibility.

  A key is visible to a row when the row's token selected block j, the key
  lies in block j (the load holds Lb >= l' keys) and is not after the token.
  sel None: every row's token selected block j (block-major entries).
  """
  visible = _visible(j, tok, geo)
  if sel is not None:
    visible &= (jnp.max(jnp.where(sel == j, 1, 0), axis=1) > 0)[:, None]
  return _logits(q, k, geo), visible


def _logits(q, k, geo: _Geometry):
  return plgpu.dot(q, k.T) * (geo.scale * LOG2E)


def _visible(j, tok, geo: _Geometry):
  """[M, Lb]: the keys of block j's load that lie in block j, not after each row's token."""
  col = jnp.arange(geo.Lb, dtype=jnp.int32)
  return ((j * geo.lp + col)[None, :] <= tok[:, None]) & (col < geo.lp)[None, :]


def _block(ref, j, geo: _Geometry):
  return ref[pl.ds(j * geo.lp, geo.Lb), :]


def _fwd_kernel(q_ref, k_ref, v_ref, blk_ref, union_ref, count_ref,
                o_ref, lse_ref, *, geo: _Geometry):
  q = q_ref[...].reshape(geo.M, geo.Dkp)
  tok, sel = _rows(blk_ref[...], _tokens(pl.program_id(0), geo), geo)

  def body(u, carry):
    acc, m, l = carry
    j = union_ref[u]
    v = _block(v_ref, j, geo)
    s, mask = _scores(q, _block(k_ref, j, geo), j, tok, sel, geo)
    m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, NEG), axis=1))
    p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
    alpha = jnp.exp2(m - m_new)
    acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_new, alpha * l + jnp.sum(p, axis=1)

  init = (jnp.zeros((geo.M, geo.Dvp), jnp.float32),
          jnp.full((geo.M,), NEG, jnp.float32), jnp.zeros((geo.M,), jnp.float32))
  acc, m, l = lax.fori_loop(0, count_ref[0], body, init)
  seen = l > 0
  l = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l[:, None]).reshape(geo.Bq, geo.Gp, geo.Dvp).astype(o_ref.dtype)
  # Rows that see nothing keep lse = 0; their p is masked to 0 in the backward.
  lse_ref[...] = jnp.where(seen, m + jnp.log2(l), 0.0).reshape(geo.Bq, geo.Gp)


def _steps(n, index_at, gather, step, init, prefetch: bool):
  """lax.fori_loop over steps 0 .. n-1 of `step(i, index, data, carry)`, where
  index = index_at(i) (loaded ids) and data = gather(index) (rows gathered by
  them); index_at must stay in bounds for every i.

  With `prefetch`, step i + 1's data and step i + 2's ids are loaded before
  step i computes, so that the dependent loads (ids, then the rows they point
  to) overlap the math instead of preceding it. H200, 64k, random q: the
  block-major forward kernel 14.5 -> 10.8 ms at G = 16, 18.4 -> 16.4 at G = 1.
  The dK/dV kernel, which gathers q and dO and holds two float32
  accumulators, got slower with it (G = 4: 40 -> 51 ms; ids only: 43 ms).
  """
  if not prefetch:
    return lax.fori_loop(
        0, n, lambda i, c: step(i, index_at(i), gather(index_at(i)), c), init)

  def body(i, loop):
    carry, index, data, index_next = loop
    data_next, index_after = gather(index_next), index_at(i + 2)
    return step(i, index, data, carry), index_next, data_next, index_after

  first = index_at(0)
  return lax.fori_loop(0, n, body, (init, first, gather(first), index_at(1)))[0]


def _clamped(hi, count: int, start):
  """Positions start .. start + count - 1 of a list slice ending at hi, past
  its end repeating the last one (0 for an empty slice, whose start is 0)."""
  return jnp.maximum(jnp.minimum(start + jnp.arange(count, dtype=jnp.int32), hi - 1), 0)


def _block_fwd_kernel(q_ref, k_ref, v_ref, entry_ref, item_ref, o_ref, lse_ref, *,
                      geo: _Geometry):
  j, lo, hi = item_ref[0], item_ref[1], item_ref[2]
  k, v = _block(k_ref, j, geo), _block(v_ref, j, geo)
  C = geo.C                               # entries per step, G rows each

  # Past hi, repeat the last entry: its rows compute the same values again
  # and store them to the same place (no masked stores needed).
  index_at = lambda step: entry_ref[_clamped(hi, C, lo + step * C)]
  gather = lambda e: q_ref[e // geo.n_pad].reshape(C * geo.Gp, geo.Dkp)

  def step(_, e, q, carry):
    tok = e // geo.n_pad
    s, mask = _scores(q, k, j, _token_rows(tok, geo), None, geo)
    # Every listed entry sees key j * l' (`_listed`), so l >= 1.
    m = jnp.max(jnp.where(mask, s, NEG), axis=1)
    p = jnp.where(mask, jnp.exp2(s - m[:, None]), 0.0)
    l = jnp.sum(p, axis=1)
    o = plgpu.dot(p.astype(v.dtype), v) / l[:, None]
    o_ref[e] = o.reshape(C, geo.Gp, geo.Dvp).astype(o_ref.dtype)
    lse_ref[e] = (m + jnp.log2(l)).reshape(C, geo.Gp)
    return carry

  _steps((hi - lo + C - 1) // C, index_at, gather, step, 0, prefetch=True)


def _dq_kernel(q_ref, k_ref, v_ref, blk_ref, union_ref, count_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, geo: _Geometry):
  q = q_ref[...].reshape(geo.M, geo.Dkp)
  do = do_ref[...].reshape(geo.M, geo.Dvp)
  lse = lse_ref[...].reshape(geo.M)
  delta = delta_ref[...].reshape(geo.M)
  tok, sel = _rows(blk_ref[...], _tokens(pl.program_id(0), geo), geo)

  def body(u, dq):
    j = union_ref[u]
    k = _block(k_ref, j, geo)
    s, mask = _scores(q, k, j, tok, sel, geo)
    p = jnp.where(mask, jnp.exp2(s - lse[:, None]), 0.0)
    ds = p * (plgpu.dot(do, _block(v_ref, j, geo).T) - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, count_ref[0], body,
                     jnp.zeros((geo.M, geo.Dkp), jnp.float32))
  dq_ref[...] = (dq * geo.scale).reshape(geo.Bq, geo.Gp, geo.Dkp).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, blk_ref, do_ref, lse_ref, delta_ref,
                ids_ref, item_ref, dk_in_ref, dv_in_ref, dk_ref, dv_ref, *dq_ref,
                geo: _Geometry):
  """dK and dV of one work item (block j, ids[lo:hi]); block-major, it also
  stores each (token, block) entry's term of dQ to dq_ref."""
  del dk_in_ref, dv_in_ref   # aliased with dk_ref, dv_ref (zeros)
  j, lo, hi = item_ref[0], item_ref[1], item_ref[2]
  k, v = _block(k_ref, j, geo), _block(v_ref, j, geo)
  block_major = bool(dq_ref)
  R = geo.C_bwd if block_major else geo.R     # entries or query tiles per step
  tokens_per_id = 1 if block_major else geo.Bq
  rows = R * tokens_per_id * geo.Gp

  def index_at(step):   # the last step may hold fewer: repeat the last id
    first = lo + step * R
    live = first + jnp.arange(R, dtype=jnp.int32) < hi
    return live, ids_ref[_clamped(hi, R, first)]

  def gather(index):
    _, ids = index
    if block_major:
      tok = ids // geo.n_pad                   # entry e = token * n_pad + slot
    else:
      tok = (ids[:, None] * geo.Bq
             + jnp.arange(geo.Bq, dtype=jnp.int32)[None, :]).reshape(R * geo.Bq)
    # An entry's token chose block j by construction; a tile's tokens may not.
    return (tok, q_ref[tok].reshape(rows, geo.Dkp), do_ref[tok].reshape(rows, geo.Dvp),
            lse_ref[tok].reshape(rows), delta_ref[tok].reshape(rows),
            None if block_major else blk_ref[tok])

  def step(_, index, data, carry):
    dk, dv = carry
    live, ids = index
    tok, q, do, lse, delta, blk = data
    rows_tok, sel = (_token_rows(tok, geo), None) if block_major else _rows(blk, tok, geo)
    s, mask = _scores(q, k, j, rows_tok, sel, geo)
    p = jnp.where(mask, jnp.exp2(s - lse[:, None]), 0.0)
    ds = p * (plgpu.dot(do, v.T) - delta[:, None])
    if block_major:   # repeated entries store the same values to the same place
      dq = plgpu.dot(ds.astype(k.dtype), k) * geo.scale
      dq_ref[0][ids] = dq.reshape(R, geo.Gp, geo.Dkp)
    live = jnp.broadcast_to(live[:, None], (R, rows // R)).reshape(rows)[:, None]
    p, ds = jnp.where(live, p, 0.0), jnp.where(live, ds, 0.0)
    dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
    return dk + plgpu.dot(ds.astype(q.dtype).T, q), dv

  dk, dv = _steps((hi - lo + R - 1) // R, index_at, gather, step,
                  (jnp.zeros((geo.Lb, geo.Dkp), jnp.float32),
                   jnp.zeros((geo.Lb, geo.Dvp), jnp.float32)), prefetch=False)
  # Rows past l' belong to block j+1: add exact zeros there (no masked
  # atomics: interpret mode lacks them).
  in_block = (jnp.arange(geo.Lb) < geo.lp)[:, None]
  keys = pl.ds(j * geo.lp, geo.Lb)
  zero = jnp.int32(0)   # int32 like `keys` (interpret mode under x64)

  @pl.when(hi > lo)
  def _():
    plgpu.atomic_add(dk_ref, (keys, pl.ds(zero, geo.Dkp)),
                     jnp.where(in_block, dk * geo.scale, 0.0))
    plgpu.atomic_add(dv_ref, (keys, pl.ds(zero, geo.Dvp)),
                     jnp.where(in_block, dv, 0.0))


# ------------------------------------------------------------ pallas calls


def _tile_specs(geo: _Geometry):
  """BlockSpecs of the per-query-tile kernels, grid (nT, HKV, B).

  Tile index fastest, so that neighbouring tiles of one head, which select
  mostly the same blocks, run together and share K/V through L2.
  Returns the per-tile spec maker and the specs of (q, k, v, blk, union, count).
  """
  def per_tile(*tail):
    return pl.BlockSpec((None, geo.Bq, None, *tail),
                        lambda i, h, b: (b, i, h) + (0,) * len(tail))

  def per_head(D):
    return pl.BlockSpec((None, geo.Tk, None, D), lambda i, h, b: (b, 0, h, 0))

  union = pl.BlockSpec((None, None, None, geo.U), lambda i, h, b: (b, h, i, 0))
  count = pl.BlockSpec((None, None, None, 1), lambda i, h, b: (b, h, i, 0))
  return per_tile, [per_tile(geo.Gp, geo.Dkp), per_head(geo.Dkp),
                    per_head(geo.Dvp), per_tile(geo.n_pad), union, count]


def _forward(q5, k, v, blk, union, count, geo: _Geometry):
  per_tile, in_specs = _tile_specs(geo)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, geo=geo),
      grid=(geo.nT, geo.HKV, geo.B),
      in_specs=in_specs,
      out_specs=[per_tile(geo.Gp, geo.Dvp), per_tile(geo.Gp)],
      out_shape=[
          jax.ShapeDtypeStruct((geo.B, geo.Tq, geo.HKV, geo.Gp, geo.Dvp), q5.dtype),
          jax.ShapeDtypeStruct((geo.B, geo.Tq, geo.HKV, geo.Gp), jnp.float32)],
      compiler_params=geo.params(), interpret=geo.interpret,
      name="nsa_selected_fwd",
  )(q5, k, v, blk, union, count)


def _block_forward(q5, k, v, blk, entries, items, geo: _Geometry):
  """The block-major forward: per-entry results (`_block_fwd_kernel`), merged."""
  HKV, E, whole = geo.HKV, geo.Tq * geo.n_pad, _whole_spec(geo)
  o_part, lse_part = pl.pallas_call(
      functools.partial(_block_fwd_kernel, geo=geo),
      grid=(items.shape[2], geo.B * HKV),
      in_specs=[
          whole(geo.Tq, geo.Gp, geo.Dkp), whole(geo.Tk, geo.Dkp), whole(geo.Tk, geo.Dvp),
          pl.BlockSpec((None, None, E), lambda w, z: (z // HKV, z % HKV, 0)),
          pl.BlockSpec((None, None, None, 4), lambda w, z: (z // HKV, z % HKV, w, 0))],
      out_specs=[whole(E, geo.Gp, geo.Dvp), whole(E, geo.Gp)],
      out_shape=[jax.ShapeDtypeStruct((geo.B, E, HKV, geo.Gp, geo.Dvp), q5.dtype),
                 jax.ShapeDtypeStruct((geo.B, E, HKV, geo.Gp), jnp.float32)],
      compiler_params=geo.params(geo.tiles.block_fwd_num_warps),
      interpret=geo.interpret, name="nsa_selected_block_fwd",
  )(q5, k, v, entries, items)
  return _merge(o_part, lse_part, blk, geo)


def _backward_dq(q5, k, v, blk, union, count, do5, lse, delta, geo: _Geometry):
  per_tile, in_specs = _tile_specs(geo)
  return pl.pallas_call(
      functools.partial(_dq_kernel, geo=geo),
      grid=(geo.nT, geo.HKV, geo.B),
      in_specs=in_specs + [per_tile(geo.Gp, geo.Dvp), per_tile(geo.Gp),
                           per_tile(geo.Gp)],
      out_specs=per_tile(geo.Gp, geo.Dkp),
      out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
      compiler_params=geo.params(), interpret=geo.interpret,
      name="nsa_selected_dq",
  )(q5, k, v, blk, union, count, do5, lse, delta)


def _whole_spec(geo: _Geometry):
  """BlockSpec maker of the block-major kernels, grid (W, B*HKV): the whole
  sequence axis of head (b, h) of a [B, L, HKV, *tail] array."""
  HKV = geo.HKV

  def whole(*shape):
    return pl.BlockSpec((None, shape[0], None, *shape[1:]),
                        lambda w, z: (z // HKV, 0, z % HKV) + (0,) * (len(shape) - 1))
  return whole


def _backward_dkv(q5, k, v, blk, do5, lse, delta, ids, items, geo: _Geometry,
                  block_major: bool):
  """dK, dV (float32, [B, Tk, HKV, D]) over work items of query tiles, or,
  block-major, of (token, block) entries, and then also the entries' dQ terms
  [B, Tq*n_pad, HKV, Gp, Dkp] (float32)."""
  HKV, whole = geo.HKV, _whole_spec(geo)
  dk0 = jnp.zeros((geo.B, geo.Tk, HKV, geo.Dkp), jnp.float32)
  dv0 = jnp.zeros((geo.B, geo.Tk, HKV, geo.Dvp), jnp.float32)
  out_specs = [whole(geo.Tk, geo.Dkp), whole(geo.Tk, geo.Dvp)]
  out_shape = [jax.ShapeDtypeStruct(dk0.shape, dk0.dtype),
               jax.ShapeDtypeStruct(dv0.shape, dv0.dtype)]
  if block_major:
    E = geo.Tq * geo.n_pad
    out_specs.append(whole(E, geo.Gp, geo.Dkp))
    out_shape.append(jax.ShapeDtypeStruct((geo.B, E, HKV, geo.Gp, geo.Dkp), jnp.float32))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, geo=geo),
      grid=(items.shape[2], geo.B * HKV),
      in_specs=[
          whole(geo.Tq, geo.Gp, geo.Dkp), whole(geo.Tk, geo.Dkp),
          whole(geo.Tk, geo.Dvp), whole(geo.Tq, geo.n_pad),
          whole(geo.Tq, geo.Gp, geo.Dvp), whole(geo.Tq, geo.Gp),
          whole(geo.Tq, geo.Gp),
          pl.BlockSpec((None, None, ids.shape[2]),
                       lambda w, z: (z // HKV, z % HKV, 0)),
          pl.BlockSpec((None, None, None, 4),
                       lambda w, z: (z // HKV, z % HKV, w, 0)),
      ] + out_specs[:2],
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases={9: 0, 10: 1},
      # Block-major float32 steps hold one more [l', D] operand (K, for dQ):
      # two stages asked for 263 KB of shared memory on an H200 (227 KB there).
      compiler_params=geo.params(geo.tiles.dkv_num_warps,
                                 1 if block_major and q5.dtype.itemsize == 4 else None),
      interpret=geo.interpret, name="nsa_selected_dkv",
  )(q5, k, v, blk, do5, lse, delta, ids, items, dk0, dv0)


# ------------------------------------------------------------- custom_vjp


def _pad_blk(block_idx, geo: _Geometry):
  """block_idx padded to whole tiles (-1 = empty)."""
  return _pad(block_idx, (geo.B, geo.Tq, geo.HKV, geo.n_pad), value=-1)


def _plan(block_idx, geo: _Geometry):
  """block_idx padded to whole tiles (blk) and the index the kernels walk:
  for query tiles each tile's block union and its size (`_tile_unions`),
  block-major the entries of each block (`_entry_index`, forward chunks)."""
  blk = _pad_blk(block_idx, geo)
  if geo.tiles.block_major:
    return blk, _entry_index(blk, geo, geo.tiles.block_entries)
  return blk, _tile_unions(blk, geo)


def _pad_qkv(q, k, v, geo: _Geometry):
  B, T, HKV = geo.B, geo.T, geo.HKV
  q5 = _pad(q.reshape(B, T, HKV, geo.G, geo.Dk), (B, geo.Tq, HKV, geo.Gp, geo.Dkp))
  return q5, _pad(k, (B, geo.Tk, HKV, geo.Dkp)), _pad(v, (B, geo.Tk, HKV, geo.Dvp))


def _unpad(x5, geo: _Geometry, D: int):
  """[B, Tq, HKV, Gp, Dp] -> [B, T, HQ, D]."""
  x = x5[:, :geo.T, :, :geo.G, :D]
  return x.reshape(geo.B, geo.T, geo.HKV * geo.G, D)


def _forward_pass(q, k, v, block_idx, geo: _Geometry):
  """o [B, T, HQ, Dv], its base-2 lse [B, T, HKV, Gp] and the index (`_plan`)
  by the tiling `geo`."""
  blk, index = _plan(block_idx, geo)
  q5, kp, vp = _pad_qkv(q, k, v, geo)
  if geo.tiles.block_major:
    o5, lse = _block_forward(q5, kp, vp, blk, *index, geo)
  else:
    o5, lse = _forward(q5, kp, vp, blk, *index, geo)
  return _unpad(o5, geo, geo.Dv), lse[:, :geo.T], index


def _backward_pass(q, k, v, block_idx, index, o, lse, do, geo: _Geometry):
  """dq, dk, dv by the tiling `geo`, p recomputed from the forward's lse."""
  blk = _pad_blk(block_idx, geo)
  q5, kp, vp = _pad_qkv(q, k, v, geo)
  B, T, HKV, G = geo.B, geo.T, geo.HKV, geo.G
  rows = (B, geo.Tq, HKV, geo.Gp)
  do5 = _pad(do.reshape(B, T, HKV, G, geo.Dv), rows + (geo.Dvp,))
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta, lse = _pad(delta.reshape(B, T, HKV, G), rows), _pad(lse, rows)
  if geo.tiles.block_major:
    # dkv_tiles=None: one program per block, as in the query-tile dK/dV.
    entries, items = index if geo.tiles.dkv_tiles else _entry_index(blk, geo, None)
    dk, dv, dq_part = _backward_dkv(q5, kp, vp, blk, do5, lse, delta, entries, items,
                                    geo, block_major=True)
    dq5 = jnp.sum(_slots(dq_part, blk, geo), axis=2).astype(q5.dtype)
  else:
    dq5 = _backward_dq(q5, kp, vp, blk, *index, do5, lse, delta, geo)
    tiles, items = _inverted_index(*index, geo)
    dk, dv = _backward_dkv(q5, kp, vp, blk, do5, lse, delta, tiles, items, geo,
                           block_major=False)
  dk = dk[:, :T, :, :geo.Dk].astype(kp.dtype)
  dv = dv[:, :T, :, :geo.Dv].astype(vp.dtype)
  return _unpad(dq5, geo, geo.Dk), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _selected(q, k, v, block_idx, choice, geos: tuple[_Geometry, ...]):
  """Selected attention by the tiling geos[choice] (`tilings`), forward and
  backward.

  The choice is made inside the custom VJP, so that the float residuals are
  the same for every tiling (q, k, v, o, lse); a switch over whole custom-VJP
  functions keeps every branch's (zeros but the chosen one's). The chosen
  tiling's index (`_plan`: sorts of block_idx) is kept for the backward,
  the others' are zeros: sorting again there was most of an ~8 ms
  fwd+bwd overhead at 64k, G = 1.
  """
  return _selected_fwd(q, k, v, block_idx, choice, geos)[0]


def _selected_fwd(q, k, v, block_idx, choice, geos):
  def zeros(geo):    # the shape of geo's index, zero-filled
    shapes = jax.eval_shape(lambda b: _plan(b, geo)[1], block_idx)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def branch(i):
    def run(q, k, v, block_idx):
      o, lse, index = _forward_pass(q, k, v, block_idx, geos[i])
      return o, lse, [index if j == i else zeros(g) for j, g in enumerate(geos)]
    return run

  o, lse, indexes = lax.switch(choice, [branch(i) for i in range(len(geos))],
                               q, k, v, block_idx)
  return o, (q, k, v, block_idx, choice, indexes, o, lse)


def _selected_bwd(geos, res, do):
  q, k, v, block_idx, choice, indexes, o, lse = res
  branches = [lambda *args, i=i: _backward_pass(*args[:4], args[4][i], *args[5:], geo=geos[i])
              for i in range(len(geos))]
  dq, dk, dv = lax.switch(choice, branches, q, k, v, block_idx, indexes, o, lse, do)
  return dq, dk, dv, None, None


_selected.defvjp(_selected_fwd, _selected_bwd)


# Estimated cost of each tiling, in narrow-tile block loads per token and KV
# head, from block_idx:
# - narrow: the blocks its tiles read per token (`_blocks_per_token`);
# - wide: WIDE_TILE_COST x the blocks its tiles read per token. A wide tile's
#   program costs about this many narrow ones per block it reads (H200,
#   G = 16, forward, ms per block read per token: narrow 1.05 at 64k, 0.144
#   at 8k; wide 2.34 at 64k, 0.44 at 8k (time-smoothed q), 0.36 at 8k
#   (block_idx of a trained model), i.e. 2.2 - 3.1x;
#   `results/check_selected_h200_v12_one_warp.json`,
#   `results/history/trained_selections_wide_cost_2_nvidia-h200.json`).
#   2.0, the 64k ratio before the narrow tile ran on one warp, picked the
#   wide tile for the trained model's choices at 8k: 2.59 / 8.44 ms fwd /
#   fwd+bwd against 2.53 / 7.30 for the narrow tile that 2.5 picks
#   (`results/trained_selections_nvidia-h200.json`);
# - block-major: (BLOCK_MAJOR_ENTRY_COST + BLOCK_MAJOR_ROW_COST x G) x the
#   (token, block) entries per token: its work is G query rows per entry,
#   whatever neighbours choose. H200, 64k, random q, fwd+bwd: a narrow tile
#   costs 0.88 ms per block load per token and KV head (G = 4, 8, 16),
#   block-major 1.11 / 0.62 / 0.34 / 0.12 of that per entry at G = 16 / 8 /
#   4 / 1 (`results/check_selected_h200_v9_prefetch.json`). The rule picks
#   the measured winner at G = 16, 8, 4, 1 on random and time-smoothed
#   queries but one: G = 1 smoothed, wide tiles 115.0 ms fwd+bwd against
#   block-major 110.4.
WIDE_TILE_COST = 2.5
BLOCK_MAJOR_ENTRY_COST = 0.06
BLOCK_MAJOR_ROW_COST = 0.065
SAMPLED_TILES = 64
# Block-major is offered only when its transient buffers take at most this
# share of the device's memory: every compiled branch's buffers count towards
# a program's peak memory, chosen or not. A quarter shut it out of T = 64k,
# batch 1 at every G <= 8 (34 GB against the 112.6 GB an H200 gives jax):
# G = 1 fwd+bwd 214 -> 600 ms. Half keeps one 64k sequence (which ran with
# block-major compiled in, v7 bench) and leaves out two.
BLOCK_MAJOR_MEMORY_SHARE = 0.5


def _block_major_bytes(geo: _Geometry, itemsize: int) -> int:
  """Transient bytes of the block-major kernels: n x the output (q.dtype) and
  its float32 lse in the forward, n x dQ (float32) in the backward."""
  entries = geo.B * geo.Tq * geo.n_pad * geo.HKV * geo.Gp
  return entries * max(geo.Dvp * itemsize + 4, geo.Dkp * 4)


def _device_memory() -> int | None:
  """Bytes the default device may allocate (None where unknown, as on the CPU)."""
  return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


class Tiling(NamedTuple):
  """One way to run the kernels (`_forward_pass`, `_backward_pass`), at ~cost."""
  name: str               # "narrow", "wide" or "block-major"
  geo: _Geometry
  cost: jax.Array         # float32 scalar, see WIDE_TILE_COST


def tilings(q, v, block_idx, config: NSAConfig, scale, interpret, tiles: Tiles) -> list[Tiling]:
  """The tilings `tiles` allows for this call, with their estimated costs.

  Block-major is offered only when it can win: its cost per entry must be
  below the narrow tile's at most one block load per entry (G <= 8), so
  G = 16 compiles no block-major kernels; and only when its transient
  buffers fit BLOCK_MAJOR_MEMORY_SHARE of the device's memory (at G = 1,
  HQ = 64, T = 64k, bf16: 34 GB per sequence; `Tiles(block_major=True)`
  runs it regardless).
  """
  make = lambda **kw: _Geometry.make(q, v, block_idx, config, scale, interpret,
                                     dataclasses.replace(tiles, **kw))
  if tiles.block_major:
    return [Tiling("block-major", make(block_major=True), jnp.zeros((), jnp.float32))]
  narrow = make(block_major=False)
  per_token = lambda geo: _blocks_per_token(_pad_blk(block_idx, geo), geo)
  options = [Tiling("narrow", narrow, per_token(narrow))]
  if tiles.wide_rows is not None:
    wide = make(block_major=False, rows=tiles.wide_rows, wide_rows=None,
                num_warps=tiles.wide_num_warps)
    if wide.Bq > narrow.Bq:                # else G fills both with one token
      options.append(Tiling("wide", wide, WIDE_TILE_COST * per_token(wide)))
  per_entry = BLOCK_MAJOR_ENTRY_COST + BLOCK_MAJOR_ROW_COST * narrow.Gp
  geo = make(block_major=True)
  memory = _device_memory()
  fits = memory is None or (_block_major_bytes(geo, q.dtype.itemsize)
                            <= BLOCK_MAJOR_MEMORY_SHARE * memory)
  if tiles.block_major is None and per_entry < 1 and fits:
    listed = _listed(_pad_blk(block_idx, geo), geo)
    options.append(Tiling("block-major", geo, per_entry * jnp.mean(
        jnp.sum(listed, axis=-1, dtype=jnp.float32))))
  return options


def default_tiles(q, k) -> Tiles:
  """`Tiles()` where it was measured (16-bit inputs, head dims <= 128), else
  the narrow tile on 2 warps, and for 4-byte inputs 64 dK/dV rows per step.

  One warp was measured faster for 16-bit, 128-wide heads only. Config B
  (Dk = 192, padded to 256 in the kernels) on one warp: whole NSA fwd+bwd at
  64k 202.7 -> 220.5 ms (H200, v8 -> v9 sweeps), as the [16, 256] tiles of a
  single warp hold twice the registers. With a head dim over 128, float32
  inputs also load in a single stage: two stages of [64, 256] float32 K and
  V blocks need 256 KB of shared memory, over the 227 KB of an H100/H200
  (seen at Dk = 192, float32); float32 dK/dV steps of 128 rows (twice the
  bytes of bf16 ones) were not tried on a GPU, 64 were."""
  wide_heads = max(q.shape[-1], k.shape[-1]) > 128
  if q.dtype.itemsize < 4:
    return Tiles(num_warps=2) if wide_heads else Tiles()
  return Tiles(dkv_rows=64, num_warps=2, num_stages=1 if wide_heads else 2)


def selected_attention(q, k, v, block_idx, *, config: NSAConfig, scale: float,
                       interpret: bool, tiles: Tiles | None = None):
  """Selected-block attention (the op `nsa_jax.selected_attention`, impl="pallas").

  Args:
    q: [B, T, HQ, Dk]; k, v: [B, T, HKV, Dk], [B, T, HKV, Dv] (float32, bf16
      or f16; accumulation is float32).
    block_idx: [B, T, HKV, n] int32, distinct block indices or -1; order free.
    config: NSAConfig (uses select_block); scale: logit scale;
    interpret: run the kernels in Pallas interpret mode (CPU).
    tiles: tile sizes and launch parameters (default: `default_tiles`).

  Returns:
    o [B, T, HQ, Dv] in q.dtype; rows that see no key get 0. Differentiable
    in q, k, v (custom VJP); block_idx gets no gradient.
  """
  tiles = default_tiles(q, v) if tiles is None else tiles
  block_idx = block_idx.astype(jnp.int32)
  options = tilings(q, v, block_idx, config, scale, interpret, tiles)
  choice = jnp.argmin(jnp.stack([t.cost for t in options]))
  return _selected(q, k, v, block_idx, choice, tuple(t.geo for t in options))
