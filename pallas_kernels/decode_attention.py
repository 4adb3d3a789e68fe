"""Split-K decode attention for NSA: one query token per sequence (paper §5.2, Table 4).

At batch 1 a decode step has only HKV groups of work, so each branch's keys
are cut into *segments* (runs of cache rows) spread over a (batch, KV head,
split) grid: every program takes the G query heads of its group (padded to a
16-row tile), walks its segments in BLOCK_K-row tiles with an online softmax,
and writes a partial result (unnormalised output, running max, sum). XLA then
merges the partials of each branch (split-K, as in flash-decoding). One kernel,
three launches:
  1. compressed keys: segments of BLOCK_K rows over the visible blocks. The
     kernel also starts the selection's block scores (Eq. 8-10), so that they
     need no second pass over k_cmp and the [Sc] scores never reach HBM: per
     tile and head it writes the tile's max score m and the tile's
     probabilities relative to it, exp(s - m), already summed into the
     selection blocks the tile overlaps (the overlap-weights matmul of
     `pallas_kernels/select_blocks.py`, at float32 accuracy). XLA rescales them
     by exp(m - lse) once lse is known, sums heads and tiles, and ranks
     (`nsa_jax.decoding.decode_selection`; top-n by `pallas_kernels/top_n.py`);
  2. selected blocks: segment j is selection block block_idx[j], rows
     [j*l', (j+1)*l') cut at the query (causal);
  3. window: BLOCK_K-aligned segments covering t-w+1 .. t.
Each program reads only rows that some query can see, rounded to whole tiles.
Reference: `nsa_jax.decoding.nsa_decode_xla`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nsa_jax.config import NSAConfig
from nsa_jax.decoding import decode_selection, num_visible_compressed
from pallas_kernels.select_blocks import _exact_dot, _overlap_matrix
from pallas_kernels.top_n import top_n

BLOCK_K = 64            # cache rows per tile
TARGET_PROGRAMS = 1024  # splits per branch aim at ~8 programs per SM of an H100/H200
NEG = float(jnp.finfo(jnp.float32).min)


def _pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _block_k(config: NSAConfig) -> int:
  return min(BLOCK_K, config.select_block)


def unsupported(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *,
                config: NSAConfig) -> str | None:
  """Why the kernel cannot take these (already validated) inputs, or None."""
  Dk, Dv, lp = q.shape[-1], v_slc.shape[-1], config.select_block
  bk = _block_k(config)
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} is not float32/bfloat16/float16"
  if not (_pow2(Dk) and _pow2(Dv) and Dk >= 16 and Dv >= 16):
    return f"head dims Dk={Dk}, Dv={Dv} must be powers of 2 >= 16"
  if not (_pow2(lp) and lp >= 16):
    return f"select_block={lp} must be a power of 2 >= 16"
  if k_slc.shape[1] % bk or k_cmp.shape[1] % bk:
    return (f"cache rows S={k_slc.shape[1]}, Sc={k_cmp.shape[1]} must be multiples of "
            f"{bk} (caches from nsa_jax.decoding.init_cache are)")
  if (bk * config.compress_stride) % lp:
    return (f"select_block={lp} must divide {bk} compressed blocks x stride "
            f"{config.compress_stride} (a tile's first selection block)")
  return None


def _tile_blocks(config: NSAConfig, bk: int) -> tuple[int, int]:
  """(selection blocks starting in a tile of bk compressed blocks, columns per
  tile: those it overlaps, padded to a power of 2 >= 16)."""
  d, l, lp = config.compress_stride, config.compress_block, config.select_block
  overlapped = ((bk - 1) * d + l - 1) // lp + 1
  return bk * d // lp, max(16, _next_pow2(overlapped))


def _partials_kernel(q_ref, k_ref, v_ref, start_ref, lo_ref, hi_ref,
                     o_ref, m_ref, l_ref, *block_refs, scale, seg_len, block_k,
                     config):
  """One program: its segments' partial softmax for the G heads of one KV group.

  Segment j covers rows start[j] .. start[j] + seg_len - 1, of which rows in
  [lo[j], hi[j]) are visible; only tiles holding visible rows are read.
  With block_refs (compressed keys, one tile per segment, seg_len = block_k):
  also the tile's selection-block sums (see the module docstring), into
  blk_ref [per, G, cols] and tile_max_ref [per, G].
  """
  q = q_ref[...]
  G, Dv = q.shape[0], o_ref.shape[-1]
  if block_refs:
    blk_ref, tile_max_ref = block_refs
    per_tile, cols = _tile_blocks(config, block_k)

  def segment(j, carry):
    start, lo, hi = start_ref[j], lo_ref[j], hi_ref[j]
    first = jnp.maximum(lo - start, 0) // block_k
    stop = (jnp.clip(hi - start, 0, seg_len) + block_k - 1) // block_k

    def tile(i, carry):
      acc, m, l, *blocks = carry
      row0 = start + i * block_k
      rows = row0 + jnp.arange(block_k)
      visible = ((rows >= lo) & (rows < hi))[None, :]
      k = k_ref[pl.ds(row0, block_k), :]
      s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale   # [G, block_k]
      s = jnp.where(visible, s, NEG)
      tile_max = s.max(axis=1)
      m_new = jnp.maximum(m, tile_max)
      if blocks:   # compressed blocks row0.. overlap selection blocks row0*d/l'..
        weights = _overlap_matrix(row0, block_k, row0 // block_k * per_tile, cols, cols,
                                  config, jnp.float32)
        p_tile = jnp.where(visible, jnp.exp(s - tile_max[:, None]), 0.0)
        blocks = [_exact_dot(p_tile, weights), tile_max]
        p = p_tile * jnp.exp(tile_max - m_new)[:, None]   # exp(s - m_new), one exp per key
      else:
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
      corr = jnp.exp(m - m_new)
      v = v_ref[pl.ds(row0, block_k), :]
      acc = acc * corr[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
      return acc, m_new, l * corr + p.sum(axis=1), *blocks

    if not block_refs:
      return lax.fori_loop(first, stop, tile, carry)
    # A tile not read (nothing visible) gets zero sums and max NEG.
    unread = (jnp.zeros((G, cols), jnp.float32), jnp.full((G,), NEG, jnp.float32))
    acc, m, l, blk, tile_max = lax.fori_loop(first, stop, tile, (*carry, *unread))
    blk_ref[j] = blk
    tile_max_ref[j] = tile_max
    return acc, m, l

  init = (jnp.zeros((G, Dv), jnp.float32), jnp.full((G,), NEG, jnp.float32),
          jnp.zeros((G,), jnp.float32))
  acc, m, l = lax.fori_loop(0, start_ref.shape[0], segment, init)
  o_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _split_k(qg, k, v, start, lo, hi, *, seg_len: int, block_k: int, scale: float,
             interpret: bool, config: NSAConfig, block_sums: bool = False):
  """Attention of qg [B, HKV, Gp, Dk] over the segments of k/v [B, N, HKV, D].

  start [B, HKV, nseg] and lo, hi (broadcastable to it) give the segments.

  Returns (o [B, HKV, Gp, Dv] f32, lse [B, HKV, Gp]) and, with `block_sums`
  (one tile per segment), the selection-block sums [B, HKV, >= nseg, Gp, cols]
  and tile maxima [B, HKV, >= nseg, Gp] of each segment (see the module
  docstring; segments past nseg are empty: zero sums, max NEG).
  """
  B, HKV, Gp, Dk = qg.shape
  N, Dv = k.shape[1], v.shape[-1]
  nseg = start.shape[-1]
  per = _next_pow2(-(-nseg // max(1, TARGET_PROGRAMS // (B * HKV))))
  P = -(-nseg // per)
  segs = [jnp.pad(jnp.broadcast_to(a, start.shape).astype(jnp.int32),
                  [(0, 0), (0, 0), (0, P * per - nseg)]).reshape(B, HKV, P, per)
          for a in (start, lo, hi)]          # padding segments are empty (lo = hi = 0)
  seg_spec = pl.BlockSpec((None, None, None, per), lambda b, h, p: (b, h, p, 0))
  out_shape = [jax.ShapeDtypeStruct((B, HKV, P, Gp, Dv), jnp.float32),
               jax.ShapeDtypeStruct((B, HKV, P, Gp), jnp.float32),
               jax.ShapeDtypeStruct((B, HKV, P, Gp), jnp.float32)]
  stat_spec = pl.BlockSpec((None, None, None, Gp), lambda b, h, p: (b, h, p, 0))
  out_specs = [pl.BlockSpec((None, None, None, Gp, Dv), lambda b, h, p: (b, h, p, 0, 0)),
               stat_spec, stat_spec]
  if block_sums:
    cols = _tile_blocks(config, block_k)[1]
    out_shape += [jax.ShapeDtypeStruct((B, HKV, P * per, Gp, cols), jnp.float32),
                  jax.ShapeDtypeStruct((B, HKV, P * per, Gp), jnp.float32)]
    out_specs += [pl.BlockSpec((None, None, per, Gp, cols), lambda b, h, p: (b, h, p, 0, 0)),
                  pl.BlockSpec((None, None, per, Gp), lambda b, h, p: (b, h, p, 0))]
  kernel = functools.partial(_partials_kernel, scale=scale, seg_len=seg_len, block_k=block_k,
                             config=config)
  out = pl.pallas_call(
      kernel, grid=(B, HKV, P),
      in_specs=[pl.BlockSpec((None, None, Gp, Dk), lambda b, h, p: (b, h, 0, 0)),
                pl.BlockSpec((None, N, None, Dk), lambda b, h, p: (b, 0, h, 0)),
                pl.BlockSpec((None, N, None, Dv), lambda b, h, p: (b, 0, h, 0)),
                seg_spec, seg_spec, seg_spec],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name="nsa_decode_partials",
  )(qg, k, v, *segs)
  o, lse = _merge(*out[:3])
  return (o, lse, *out[3:]) if block_sums else (o, lse)


def _merge(o, m, l):
  """Combines split partials [B, HKV, P, ...] into (o [B, HKV, Gp, Dv], lse [B, HKV, Gp])."""
  top = m.max(axis=2, keepdims=True)
  w = jnp.exp(m - top)
  total = (w * l).sum(axis=2)
  seen = total > 0
  total = jnp.where(seen, total, 1.0)
  out = (w[..., None] * o).sum(axis=2) / total[..., None]
  return out, jnp.where(seen, top[:, :, 0] + jnp.log(total), -jnp.inf)


def _block_scores(blk, tile_max, lse, G: int, config: NSAConfig, seq_len: int):
  """Block importance [B, HKV, Ts] (Eq. 9-10) from the compressed kernel's tiles.

  blk [B, HKV, nt, Gp, cols] are tile c's probabilities relative to its max
  tile_max [B, HKV, nt, Gp], summed into the selection blocks c*per_tile + u
  (column u); lse [B, HKV, Gp] is the branch's. Heads >= G are padding.
  """
  B, HKV, nt, Gp, cols = blk.shape
  per_tile = _tile_blocks(config, _block_k(config))[0]
  seen = (jnp.arange(Gp) < G)[None, None, :] & (lse > -jnp.inf)          # [B, HKV, Gp]
  rescale = jnp.exp(tile_max - jnp.where(seen, lse, 0.0)[:, :, None, :])
  rescale = jnp.where(seen[:, :, None, :], rescale, 0.0)                   # [B, HKV, nt, Gp]
  tiles = jnp.sum(rescale[..., None] * blk, axis=3)                        # [B, HKV, nt, cols]
  # Column u of tile c is block c*per_tile + u: add the columns in strips of
  # per_tile, strip k shifted k tiles to the right.
  strips = -(-cols // per_tile)
  tiles = jnp.pad(tiles, [(0, 0), (0, 0), (0, 0), (0, strips * per_tile - cols)])
  length = (nt + strips) * per_tile
  total = sum(jnp.pad(tiles[..., k * per_tile:(k + 1) * per_tile].reshape(B, HKV, nt * per_tile),
                      [(0, 0), (0, 0), (k * per_tile, length - (nt + k) * per_tile)])
              for k in range(strips))
  Ts = config.num_select_blocks(seq_len)
  return jnp.pad(total, [(0, 0), (0, 0), (0, max(0, Ts - length))])[..., :Ts]


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *,
               config: NSAConfig, scale: float, interpret: bool):
  """Kernel path of `nsa_jax.decoding.nsa_decode`: (o [B, HQ, Dv], block_idx [B, HKV, n])."""
  B, HQ, Dk = q.shape
  Sc, HKV = k_cmp.shape[1], k_cmp.shape[2]
  S, lp, w = k_slc.shape[1], config.select_block, config.window
  G = HQ // HKV
  bk = _block_k(config)
  qg = jnp.pad(q.reshape(B, HKV, G, Dk), [(0, 0), (0, 0), (0, max(16, _next_pow2(G)) - G), (0, 0)])
  run = functools.partial(_split_k, qg, block_k=bk, scale=scale, interpret=interpret,
                          config=config)
  t = lengths - 1
  per_head = lambda x: jnp.broadcast_to(x, (B, HKV, x.shape[-1]))
  ar = lambda n: jnp.arange(n, dtype=jnp.int32)

  ntc = num_visible_compressed(t, config)
  start = per_head(ar(Sc // bk)[None, None, :] * bk)
  o_cmp, lse, blk, tile_max = run(k_cmp, v_cmp, start, 0, ntc[:, None, None], seg_len=bk,
                                  block_sums=True)
  block_idx = decode_selection(_block_scores(blk, tile_max, lse, G, config, S), t, config,
                               top_k=functools.partial(top_n, interpret=interpret))

  chosen = block_idx >= 0
  start = jnp.where(chosen, block_idx * lp, 0)
  hi = jnp.where(chosen, jnp.minimum(start + lp, t[:, None, None] + 1), 0)
  o_slc, _ = run(k_slc, v_slc, start, start, hi, seg_len=lp)

  lo = jnp.maximum(t - w + 1, 0)
  tiles = min(-(-w // bk) + 1, S // bk)   # w rows from an aligned start: <= w/bk + 1 tiles
  start = per_head((lo // bk * bk)[:, None, None] + ar(tiles)[None, None, :] * bk)
  o_win, _ = run(k_win, v_win, start, lo[:, None, None], t[:, None, None] + 1, seg_len=bk)

  g = gates.reshape(B, HKV, G, 3, 1).astype(jnp.float32)
  o = (g[..., 0, :] * o_cmp[:, :, :G] + g[..., 1, :] * o_slc[:, :, :G]
       + g[..., 2, :] * o_win[:, :, :G])
  return o.reshape(B, HQ, -1).astype(q.dtype), block_idx
