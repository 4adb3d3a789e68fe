"""Index planning of the selected-attention kernels, in XLA (sorts, no Pallas).

The query-tile kernels walk each tile's *union* of selected blocks
(`tile_unions`); the dK/dV kernel and the block-major kernels run one program
per KV block over an *inverted index*: the query tiles (`inverted_index`) or
the (token, slot) entries (`entry_index`) that chose the block, cut into work
items (`_work_items`). The block-major forward's per-entry results are merged
here too (`merge`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _util
from pallas_kernels.selected_attention.tiles import NEG, Geometry

INT32_MAX = int(jnp.iinfo(jnp.int32).max)


def distinct(blk, geo: Geometry):
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


def tile_unions(blk, geo: Geometry):
  """Sorted union of each query tile's selected blocks.

  blk [B, Tq, HKV, n_pad] -> union [B, HKV, nT, U] int32 (valid entries
  first, ascending) and count [B, HKV, nT, 1].
  """
  x, keep = distinct(blk, geo)
  union = jnp.sort(jnp.where(keep, x, INT32_MAX), axis=-1)[..., :geo.U]
  count = jnp.sum(keep, axis=-1, dtype=jnp.int32)[..., None]
  return union, count


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


def inverted_index(union, count, geo: Geometry):
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


def listed(blk):
  """[B, Tq, HKV, n_pad] bool: the (token, slot) entries the block-major
  forward computes: the slots `pad_blk` left non-empty."""
  return blk >= 0


def entry_index(blk, geo: Geometry, chunk: int | None):
  """For each KV block, the (token, slot) entries that selected it.

  Returns entries [B, HKV, Tq*n_pad] (entry e = token * n_pad + slot, sorted
  by block) and items [B, HKV, W, 4] (`_work_items`, chunks of `chunk`
  entries; None = one item per block).
  """
  B, HKV, E = geo.B, geo.HKV, geo.Tq * geo.n_pad
  j = jnp.where(listed(blk), blk, geo.nb)
  j = jnp.transpose(j, (0, 2, 1, 3)).reshape(B * HKV, E)
  e = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32)[None, :], (B * HKV, E))
  entries, items = _work_items(j, e, geo.nb, chunk or E)
  return entries.reshape(B, HKV, E), items.reshape(B, HKV, -1, 4)


def slots(part, blk, geo: Geometry, fill=0.0):
  """[B, Tq*n_pad, HKV, Gp, ...] per-entry results -> [B, Tq, n_pad, HKV, Gp, ...],
  `fill` in the slots not listed (never written by the kernels)."""
  x = part.reshape(geo.B, geo.Tq, geo.n_pad, *part.shape[2:])
  listed = _slot_mask(blk, geo)
  return jnp.where(listed.reshape(listed.shape + (1,) * (x.ndim - listed.ndim)), x, fill)


def _slot_mask(blk, geo: Geometry):
  """[B, Tq, n_pad, HKV, 1]: `listed` in the layout of `slots`."""
  return jnp.transpose(listed(blk), (0, 1, 3, 2))[..., None]


def merge(o_part, lse_part, blk, geo: Geometry):
  """Combines the block-major forward's per-entry results into o and lse.

  o_part [B, Tq*n_pad, HKV, Gp, Dvp], lse_part [B, Tq*n_pad, HKV, Gp]: each
  listed entry's attention over its one block (normalised) and base-2
  log-sum-exp. o = sum_k 2^(lse_k - lse) o_k with lse = log2 sum_k 2^lse_k
  (Eq. 10 over the union of the blocks). Rows that see nothing get o = 0 and
  lse = 0, as in the query-tile forward.
  """
  listed = _slot_mask(blk, geo)
  lse_k = slots(lse_part, blk, geo, NEG)                        # [B, Tq, n, HKV, Gp]
  m = jnp.max(lse_k, axis=2)
  w = jnp.where(listed, jnp.exp2(lse_k - m[:, :, None]), 0.0)
  l = jnp.sum(w, axis=2)                                         # [B, Tq, HKV, Gp]
  o = jnp.sum(w[..., None] * slots(o_part, blk, geo).astype(jnp.float32), axis=2)
  seen = l > 0
  o = o / jnp.where(seen, l, 1.0)[..., None]
  return o.astype(o_part.dtype), jnp.where(seen, m + jnp.log2(l), 0.0)


def pad_blk(block_idx, q_offset, geo: Geometry):
  """block_idx padded to whole tiles, with -1 (empty) also in the slots of blocks
  after their token, in which the reference sees no key; query row t sits at
  position q_offset + t ([1] int32)."""
  blk = _util.pad_to(block_idx, (geo.B, geo.Tq, geo.HKV, geo.n_pad), value=-1)
  t = q_offset[0] + jnp.arange(geo.Tq, dtype=jnp.int32).reshape(1, geo.Tq, 1, 1)
  return jnp.where(blk * geo.lp <= t, blk, -1)


def plan_index(block_idx, q_offset, geo: Geometry):
  """block_idx padded to whole tiles (blk, `pad_blk`) and the index the kernels
  walk: for query tiles each tile's block union and its size (`tile_unions`),
  block-major the entries of each block (`entry_index`, forward chunks)."""
  blk = pad_blk(block_idx, q_offset, geo)
  if geo.tiles.block_major:
    return blk, entry_index(blk, geo, geo.tiles.block_entries)
  return blk, tile_unions(blk, geo)
