"""Banded flash-attention kernels (pallas_kernels/_flash.py) vs their references.

Window attention (window_attention_xla) and compressed attention
(compressed_attention_xla) run in Pallas interpret mode on the CPU in float32:
forward outputs, lse, and the gradients of q, k, v (jax.vjp with random
cotangents, including one on lse for compressed attention). Small tiles make
the kernels walk several key blocks with and without the mask, so each case
piles up edge conditions: T not a multiple of any tile, T < w, T < l
(no compressed block), query rows that see nothing, G in {1, 2, 3, 16},
Dk != Dv, batch 2. Each case compiles once: compiles dominate the run time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import NSAConfig
from nsa_jax.ops import segments
from nsa_jax.ops.compressed import compressed_attention_xla
from nsa_jax.ops.window import window_attention_xla
from pallas_kernels import _flash, _flash_tiles
from pallas_kernels.compressed_attention import compressed_attention
from pallas_kernels.window_attention import window_attention
from tests import rand

SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=16,
                  num_selected=4, window=16)
WIDE = NSAConfig(compress_block=8, compress_stride=4, select_block=16,
                 num_selected=4, window=40)   # w not a power of two
# 16-key blocks and 16- or 32-row query tiles: several inner (unmasked) blocks.
SMALL_TILES = _flash_tiles.Tiles(block_m=16, block_k=16, bwd_block_m=32,
                           bwd_block_k=16, dkv_splits=3)
RTOL = 1e-4   # float32, same math in another summation order: errors ~1e-6


def _assert_close(got, want, name):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert np.isfinite(got).all(), f"{name}: non-finite values"
  err = np.max(np.abs(got - want), initial=0.0)
  ref = max(np.max(np.abs(want), initial=0.0), 1e-6)
  assert err <= RTOL * ref, f"{name}: max error {err:.3g} vs max |ref| {ref:.3g}"


def _inputs(seed, B, T, S, HKV, G, Dk, Dv):
  ks = rand.split(rand.key(seed), 6)
  q = rand.normal(ks[0], (B, T, HKV * G, Dk), jnp.float32)
  k = rand.normal(ks[1], (B, S, HKV, Dk), jnp.float32)
  v = rand.normal(ks[2], (B, S, HKV, Dv), jnp.float32)
  do = rand.normal(ks[3], (B, T, HKV * G, Dv), jnp.float32)
  dlse = rand.normal(ks[4], (B, T, HKV * G), jnp.float32)
  return q, k, v, do, dlse


def _sizes(config):
  """The compressed kernel's sizes of a config."""
  return dict(block=config.compress_block, stride=config.compress_stride)


def _vjp(fn, q, k, v, ct):
  out, pullback = jax.vjp(fn, q, k, v)
  return out, pullback(ct)


WINDOW_CASES = [
    # B, T, HKV, G, Dk, Dv, config, tiles
    (2, 77, 2, 2, 32, 16, SMALL, SMALL_TILES),
    (1, 130, 1, 16, 16, 16, WIDE, SMALL_TILES),
    (1, 5, 1, 1, 16, 16, SMALL, _flash_tiles.Tiles()),  # T < w, default tiles
]


@pytest.mark.parametrize("B,T,HKV,G,Dk,Dv,config,tiles", WINDOW_CASES)
def test_window_matches_reference(B, T, HKV, G, Dk, Dv, config, tiles):
  q, k, v, do, _ = _inputs(T, B, T, T, HKV, G, Dk, Dv)
  scale = 0.7 / Dk ** 0.5
  kernel = jax.jit(lambda q, k, v, ct: _vjp(
      lambda *a: window_attention(*a, window=config.window, scale=scale,
                                  interpret=True, tiles=tiles), q, k, v, ct))
  ref = jax.jit(lambda q, k, v, ct: _vjp(
      lambda *a: window_attention_xla(*a, config=config, scale=scale),
      q, k, v, ct))
  (o, grads), (o_ref, grads_ref) = kernel(q, k, v, do), ref(q, k, v, do)
  _assert_close(o, o_ref, "o")
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    _assert_close(g, g_ref, f"d{name}")


COMPRESSED_CASES = [
    (2, 77, 2, 2, 32, 16, SMALL, SMALL_TILES),   # rows t < 7 see no block
    (1, 130, 1, 16, 16, 16, SMALL, SMALL_TILES),
    # G = 3 (padded to 4), default tiles: one query tile, T < w.
    (1, 61, 2, 3, 16, 32, WIDE, _flash_tiles.Tiles(dkv_splits=2)),
    # Dk > 128 (padded to 256) with the default tiles for such heads.
    (1, 40, 1, 2, 160, 32, SMALL, None),
]


@pytest.mark.parametrize("B,T,HKV,G,Dk,Dv,config,tiles", COMPRESSED_CASES)
def test_compressed_matches_reference(B, T, HKV, G, Dk, Dv, config, tiles):
  Tc = config.num_compressed(T)
  q, k, v, do, dlse = _inputs(T, B, T, Tc, HKV, G, Dk, Dv)
  scale = 1.3 / Dk ** 0.5
  kernel = jax.jit(lambda q, k, v, ct: _vjp(
      lambda *a: compressed_attention(*a, **_sizes(config), scale=scale,
                                      interpret=True, tiles=tiles),
      q, k, v, ct))
  ref = jax.jit(lambda q, k, v, ct: _vjp(
      lambda *a: compressed_attention_xla(*a, config=config, scale=scale),
      q, k, v, ct))
  ((o, lse), grads), ((o_ref, lse_ref), grads_ref) = (
      kernel(q, k, v, (do, dlse)), ref(q, k, v, (do, dlse)))
  blind = np.arange(T) < config.compress_block - 1   # queries that see nothing
  assert lse.dtype == jnp.float32
  np.testing.assert_array_equal(np.isneginf(lse), blind[None, :, None] & np.ones(lse.shape, bool))
  np.testing.assert_array_equal(np.asarray(o)[:, blind], 0.0)
  _assert_close(o, o_ref, "o")
  _assert_close(jnp.where(jnp.isinf(lse), 0.0, lse),
                jnp.where(jnp.isinf(lse_ref), 0.0, lse_ref), "lse")
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    _assert_close(g, g_ref, f"d{name}")
  assert not np.asarray(grads[0])[:, blind].any(), "blind rows get no dq"


def test_compressed_default_tiles_follow_dtype_and_head_width():
  from pallas_kernels import compressed_attention as kernel
  x = lambda Dk, dtype=jnp.bfloat16, H=2: jax.ShapeDtypeStruct((1, 8, H, Dk), dtype)
  tiles = lambda Dk, dtype=jnp.bfloat16: kernel.default_tiles(x(Dk, dtype), x(Dk, dtype, 1),
                                                              x(Dk, dtype, 1))
  assert tiles(128) == kernel.TILES
  assert tiles(192).bwd_block_m == kernel.WIDE_HEAD_BWD_BLOCK_M
  assert tiles(192).block_m == kernel.TILES.block_m   # forward unchanged
  assert tiles(128, jnp.float32) == kernel.TILES.for_float32()


def test_compressed_without_blocks():
  """T < l: Tc = 0, zero output, lse = -inf, zero gradient for q."""
  q, k, v, do, dlse = _inputs(0, 1, 5, 0, 2, 2, 16, 16)
  (o, lse), (dq, dk, dv) = jax.jit(lambda q, k, v, ct: _vjp(   # one compile, not per op
      lambda *a: compressed_attention(*a, **_sizes(SMALL), scale=0.25,
                                      interpret=True), q, k, v, ct))(q, k, v, (do, dlse))
  assert not np.asarray(o).any() and np.isneginf(lse).all()
  assert not np.asarray(dq).any() and dk.shape == k.shape and dv.shape == v.shape


def test_public_ops_dispatch_to_kernels():
  """nsa_jax.window_attention / compressed_attention with impl="pallas"
  (forward only: the gradients are checked above)."""
  q, k, v, _, _ = _inputs(1, 1, 40, 40, 2, 2, 16, 16)
  Tc = SMALL.num_compressed(40)
  for impl_fn, args in [(nsa_jax.window_attention, (q, k, v)),
                        (nsa_jax.compressed_attention, (q, k[:, :Tc], v[:, :Tc]))]:
    outs = [jax.jit(lambda *a, impl=impl: impl_fn(
        *a, config=SMALL, impl=impl, interpret=True))(*args)
            for impl in ("pallas", "xla")]
    flat, flat_ref = (jax.tree.leaves(x) for x in outs)
    for i, (a, b) in enumerate(zip(flat, flat_ref)):
      finite = np.isfinite(np.asarray(b))
      np.testing.assert_array_equal(np.isfinite(np.asarray(a)), finite)
      _assert_close(np.where(finite, a, 0), np.where(finite, b, 0),
                    f"{impl_fn.__name__} output {i}")


@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed-offset"])
@pytest.mark.parametrize("band", [_flash.Band(1, 0, 16), _flash.Band(1, 0, 40),
                                  _flash.Band(4, 7, None), _flash.Band(2, 3, 9)])
def test_block_ranges_match_the_mask(band, packed):
  """The loop bounds cover every visible (query, key) pair, and the inner,
  unmasked blocks hold visible pairs only (checked against the dense mask).
  Packed: documents start at positions 0, 16 and 48 (`_flash.Documents`: the
  tiles' least and greatest s(t), the key tiles' least and greatest document
  end), and the query rows sit at positions 9 .. 9 + T - 1 (query offset)."""
  T, S, bq, bk = 70, 53, 4, 16
  q0 = 9 if packed else 0
  total = q0 + T
  bounds = [0, 16, 48, total] if packed else [0, total]
  start_of, end_of = np.zeros(total, np.int64), np.zeros(total, np.int64)
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    start_of[lo:hi], end_of[lo:hi] = lo, hi
  positions = q0 + np.arange(T)
  # Per key, the end of the document of its first token (past the row: the last's).
  key_end = end_of[np.minimum(np.arange(S) * band.stride, total - 1)]
  t, j = positions[:, None], np.arange(S)[None, :]
  mask = np.asarray(band.visible(t, j, S, start_of[t] if packed else None))
  for t0 in range(0, T, bq):
    rows = mask[t0:t0 + bq]
    tile_starts = start_of[positions[np.minimum(np.arange(t0, t0 + bq), T - 1)]]
    docs = (tile_starts.min(), tile_starts.max()) if packed else None
    lo, full_lo, full_hi, hi = map(int, band.key_blocks(q0 + t0, q0 + t0 + bq - 1, S, bk, docs))
    assert lo <= full_lo <= full_hi <= hi
    seen = np.flatnonzero(rows.any(0))
    if seen.size:
      assert lo * bk <= seen[0] and seen[-1] < hi * bk
    assert rows[:, full_lo * bk:full_hi * bk].all()
    if band.window is not None:   # work per tile is bounded by the band width
      assert hi - lo <= -(-(bq + band.window - 1) // bk) + 1
  for j0 in range(0, S + bk, bk):
    cols = np.zeros((T, bk), bool)
    cols[:, :max(0, min(S - j0, bk))] = mask[:, j0:j0 + bk]
    tile_ends = key_end[np.minimum(np.arange(j0, j0 + bk), S - 1)]
    ends = (tile_ends.min(), tile_ends.max()) if packed else None
    lo, full_lo, full_hi, hi = map(int, band.query_tiles(j0, j0 + bk - 1, T, S, bq, q0, ends))
    assert lo <= full_lo <= full_hi <= hi
    seen = np.flatnonzero(cols.any(1))
    if seen.size:
      assert lo * bq <= seen[0] and seen[-1] < hi * bq
    assert cols[full_lo * bq:full_hi * bq].all()


@pytest.mark.parametrize("kind", ["window", "compressed"])
def test_query_offset_gives_those_rows(kind):
  """A private argument for context parallelism (#23): the kernels on the queries
  t0 .. T-1 alone, at positions from a traced q_offset = t0, with all keys and packed
  rows, give those rows of the whole: o, lse, dq, and dk, dv under a cotangent on
  those rows only."""
  B, T, HKV, G, Dk, Dv, t0 = 2, 77, 2, 2, 16, 8, 37   # t0 inside a tile and a document
  segment_ids = np.stack([np.repeat([0, 1, 2], [16, 32, 29]), np.repeat([0, 1], [48, 29])])
  starts = segments.document_starts(jnp.asarray(segment_ids))
  ends = segments.document_ends(jnp.asarray(segment_ids))
  S = T if kind == "window" else SMALL.num_compressed(T)
  q, k, v, do, dlse = _inputs(7, B, T, S, HKV, G, Dk, Dv)

  def run(q, k, v, doc_start, q_offset):
    if kind == "window":
      o = window_attention(q, k, v, window=SMALL.window, scale=0.3, interpret=True,
                           tiles=SMALL_TILES, doc_start=doc_start, doc_end=ends,
                           q_offset=q_offset)
      return o, jnp.zeros(o.shape[:3], jnp.float32)   # window: no lse
    return compressed_attention(q, k, v, **_sizes(SMALL), scale=0.3, interpret=True,
                                tiles=SMALL_TILES, doc_start=doc_start, doc_end=ends,
                                q_offset=q_offset)

  rows = (jnp.arange(T) >= t0)[None, :, None]
  ct = (do * rows[..., None], dlse * rows)
  whole = jax.jit(lambda q, k, v: _vjp(lambda *a: run(*a, starts, None), q, k, v, ct))
  part = jax.jit(lambda q, k, v, q0: _vjp(lambda *a: run(*a, starts[:, t0:], q0), q, k, v,
                                          tuple(c[:, t0:] for c in ct)))
  (o, lse), (dq, dk, dv) = whole(q, k, v)
  (o_p, lse_p), (dq_p, dk_p, dv_p) = part(q[:, t0:], k, v, jnp.int32(t0))
  _assert_close(o_p, o[:, t0:], "o")
  _assert_close(jnp.where(jnp.isinf(lse_p), 0, lse_p), jnp.where(jnp.isinf(lse), 0, lse)[:, t0:],
                "lse")
  _assert_close(dq_p, dq[:, t0:], "dq")
  _assert_close(dk_p, dk, "dk")
  _assert_close(dv_p, dv, "dv")
