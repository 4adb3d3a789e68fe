"""Pallas top-n block selection (pallas_kernels/select_blocks.py) against select_blocks_xla.

Runs the kernel in interpret mode on the CPU. Selections are compared as sets
(order inside block_idx is free). The kernel sums the probabilities in another
order than the reference, so two blocks whose reference scores agree to ~1e-7
may legitimately swap across the n-th place: `assert_same_selection` requires
equal sets wherever the reference's n-th and (n+1)-th scores are more than
RTOL apart, and elsewhere allows swaps only between blocks whose reference
scores differ by less than RTOL (relative).
"""
import dataclasses
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import nsa_jax
from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common, segments
from nsa_jax.ops._common import selection_sizes
from nsa_jax.ops.compressed import compressed_scores
from nsa_jax.ops.selection import group_block_scores, select_blocks_xla
from pallas_kernels import select_blocks as select_blocks_module
from pallas_kernels.select_blocks import Tiles, select_blocks
from tests import rand

RTOL = 1e-5

PAPER_N4 = NSAConfig(num_selected=4)
SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=16,
                  num_selected=4, window=16)
SMALL_N5 = NSAConfig(compress_block=8, compress_stride=4, select_block=16,
                     num_selected=5, window=16)
EQUAL_BLOCKS = NSAConfig(compress_block=16, compress_stride=8, select_block=16,
                         num_selected=4, num_initial=0)


@functools.cache   # one jitted function per (config, scale, Ts): its compiles are reused
def _block_scores(config, scale, Ts):
  """[B, HKV, T, Ts] float64 block scores of the reference, in one compiled program (not
  one compile per primitive op by op)."""
  @jax.jit
  def block_scores(q, k_cmp, doc_start):
    s, mask = compressed_scores(q.astype(jnp.float64), 0,
                                k_cmp.astype(jnp.float64), config, scale, doc_start)
    p, _ = _common.masked_softmax(s, mask)
    return group_block_scores(p, config, Ts)
  return block_scores


@functools.cache   # one jitted function per (config, scale): its compiles are reused
def _reference_selection(config, scale):
  return jax.jit(lambda q, k_cmp, doc_start: select_blocks_xla(
      q, k_cmp, config=config, scale=scale, doc_start=doc_start))


def ranked_reference_scores(q, k_cmp, config, scale, doc_start=None):
  """[B, T, HKV, Ts] float64 scores as ranked: forced +inf, non-candidates -inf;
  doc_start [B, T]: packed rows (docs/semantics.md#packed-rows)."""
  B, T, HQ, _ = q.shape
  HKV = k_cmp.shape[2]
  Ts = config.num_select_blocks(T)
  if k_cmp.shape[1] == 0:
    scores = jnp.zeros((B, HKV, T, Ts))
  else:
    scores = _block_scores(config, scale, Ts)(q, k_cmp, doc_start)
  scores = np.moveaxis(np.asarray(scores), 1, 2)
  t = np.arange(T)[:, None, None]
  j = np.arange(Ts)
  current = t // config.select_block
  first = 0 if doc_start is None else np.asarray(doc_start)[:, :, None, None] // config.select_block
  candidate = (j <= current) & (j >= first)
  forced = candidate & ((j < first + config.num_initial) | (j > current - config.num_local))
  ranked = np.where(candidate, scores, -np.inf)
  return np.where(forced, np.inf, ranked)


def assert_same_selection(block_idx, q, k_cmp, config, scale, exact=False, doc_start=None):
  """block_idx selects what select_blocks_xla selects, up to near-ties (module doc)."""
  block_idx = np.asarray(block_idx)
  reference = np.asarray(_reference_selection(config, scale)(q, k_cmp, doc_start))
  assert block_idx.shape == reference.shape
  assert block_idx.dtype == np.int32
  ranked = ranked_reference_scores(q, k_cmp, config, scale, doc_start)
  differing = 0
  for pos in np.ndindex(*block_idx.shape[:3]):
    got, want = block_idx[pos], reference[pos]
    chosen = got[got >= 0]
    assert len(set(chosen)) == len(chosen), (pos, got)
    assert np.sum(got < 0) == np.sum(want < 0), (pos, got, want)
    row = ranked[pos]
    assert np.all(row[chosen] > -np.inf), (pos, got)      # candidates only
    missed = sorted(set(want[want >= 0]) - set(chosen))
    if not missed:
      continue
    differing += 1
    assert not exact, (pos, got, want)
    extra = sorted(set(chosen) - set(want))
    hi, lo = row[missed].max(), row[extra].min()
    assert np.isfinite(hi) and np.isfinite(lo), (pos, got, want, row)
    assert hi - lo <= RTOL * abs(hi), (pos, got, want, row[missed], row[extra])
  return differing


def random_inputs(seed, B, T, HQ, HKV, Dk, config, dtype=jnp.float32):
  kq, kk = rand.split(rand.key(seed))
  q = rand.normal(kq, (B, T, HQ, Dk), dtype)
  k_cmp = rand.normal(kk, (B, config.num_compressed(T), HKV, Dk), dtype)
  return q, k_cmp


CASES = [
    # (T, HQ, HKV, Dk, config, dtype, tiles)
    pytest.param(300, 4, 2, 32, SMALL, jnp.float32, Tiles(block_q=16, block_k=16),
                 id="small-T300-G2-multitile-multichunk"),
    pytest.param(40, 16, 1, 32, PAPER_N4, jnp.float32, Tiles(), id="paper-T40-below-lp-G16"),
    pytest.param(5, 4, 2, 32, NSAConfig(), jnp.float32, Tiles(), id="paper-T5-no-cmp-block"),
    pytest.param(130, 2, 2, 32, EQUAL_BLOCKS, jnp.float32, Tiles(block_k=16),
                 id="l-eq-lp-no-initial-G1"),
    # tiles None: called like the public op does (test_public_op_... reuses
    # the reference's compilation of this case).
    pytest.param(77, 6, 2, 40, SMALL_N5, jnp.bfloat16, None, id="bf16-n5-Dk40-G3"),
]


@pytest.mark.parametrize("group_score", ["sum", "max"])
@pytest.mark.parametrize("T, HQ, HKV, Dk, config, dtype, tiles", CASES)
def test_matches_reference(T, HQ, HKV, Dk, config, dtype, tiles, group_score):
  """Heads of a group summed (Eq. 10) or their max (config.group_score)."""
  config = dataclasses.replace(config, group_score=group_score)
  q, k_cmp = random_inputs(T, 2, T, HQ, HKV, Dk, config, dtype)
  scale = _common.resolve_scale(None, q)       # the public op's default
  tiles_arg = {} if tiles is None else {"tiles": tiles}
  block_idx = select_blocks(q, k_cmp, sizes=selection_sizes(config), scale=scale,
                            interpret=True, **tiles_arg)
  differing = assert_same_selection(block_idx, q, k_cmp, config, scale)
  # Near-ties at ~1e-7 are rare: nearly every row must agree exactly.
  assert differing <= 0.01 * block_idx.size / config.num_selected
  if config.num_compressed(T) == 0:      # no scores: the forced block 0 only
    np.testing.assert_array_equal(np.asarray(block_idx)[..., 0], 0)
    np.testing.assert_array_equal(np.asarray(block_idx)[..., 1:], -1)


def test_exact_ties_go_to_lower_index():
  """Two dominant compressed blocks (0 and 9): all other probabilities underflow to 0.

  Every non-forced candidate except selection block 2 (which holds compressed
  block 9) then scores exactly 0 in both implementations, so the kernel must
  break those ties to the lower index exactly as the reference, across chunks
  (block_k=16 gives chunks of 3 selection blocks) and query tiles.
  """
  config = SMALL_N5
  B, T, HQ, HKV, Dk = 1, 130, 4, 2, 16
  q = jnp.zeros((B, T, HQ, Dk), jnp.float32).at[..., 0].set(100.0)
  Tc = config.num_compressed(T)
  k_cmp = jnp.zeros((B, Tc, HKV, Dk), jnp.float32).at[..., 0].set(-100.0)
  k_cmp = k_cmp.at[:, jnp.array([0, 9]), :, 0].set(100.0)
  block_idx = select_blocks(q, k_cmp, sizes=selection_sizes(config), scale=1.0, interpret=True,
                            tiles=Tiles(block_q=16, block_k=16))
  assert_same_selection(block_idx, q, k_cmp, config, 1.0, exact=True)


def test_public_op_dispatches_to_kernel(monkeypatch):
  """nsa_jax.select_blocks(impl="pallas"): default scale and tiles (the inputs
  of the bf16 case above, so the reference's compilation is reused)."""
  calls = []
  monkeypatch.setattr(select_blocks_module, "select_blocks",
                      lambda *args, **kwargs: calls.append(kwargs) or
                      select_blocks(*args, **kwargs))
  q, k_cmp = random_inputs(77, 2, 77, 6, 2, 40, SMALL_N5, jnp.bfloat16)
  got = jax.jit(lambda q, k_cmp: nsa_jax.select_blocks(   # traced afresh: one compile
      q, k_cmp, config=SMALL_N5, impl="pallas", interpret=True))(q, k_cmp)
  assert len(calls) == 1 and calls[0]["interpret"] is True
  assert_same_selection(got, q, k_cmp, SMALL_N5, _common.resolve_scale(None, q))


def test_given_lse_skips_pass_1():
  """lse from the compressed branch (xla) selects like the kernel's own pass 1.

  G = 3 (lse padded to 4 heads), several query tiles and chunks, and rows
  t < l - 1 whose lse is -inf.
  """
  config = SMALL
  q, k_cmp = random_inputs(1, 2, 70, 6, 2, 32, config)
  v_cmp = jnp.zeros(k_cmp.shape, k_cmp.dtype)
  scale = _common.resolve_scale(None, q)
  _, lse = jax.jit(lambda q, k_cmp, v_cmp: nsa_jax.compressed_attention(
      q, k_cmp, v_cmp, config=config, scale=scale, impl="xla"))(q, k_cmp, v_cmp)
  assert np.all(np.isneginf(np.asarray(lse)[:, :config.compress_block - 1]))
  tiles = Tiles(block_q=16, block_k=16)
  without = select_blocks(q, k_cmp, sizes=selection_sizes(config), scale=scale, interpret=True,
                          tiles=tiles)
  given = select_blocks(q, k_cmp, sizes=selection_sizes(config), scale=scale, interpret=True,
                        tiles=tiles, lse=lse)
  differing = assert_same_selection(given, q, k_cmp, config, scale)
  assert differing <= 0.01 * given.size / config.num_selected
  as_sets = lambda idx: np.sort(np.asarray(idx), axis=-1)
  assert np.mean(np.all(as_sets(given) == as_sets(without), axis=-1)) >= 0.99


def test_given_lse_default_tiles_paper_sizes():
  """With lse given, the default tiles are WITH_LSE (128-key tiles: chunks of
  31 selection blocks); paper block sizes, T = 2200 (two chunks), G = 2."""
  config = NSAConfig()
  q, k_cmp = random_inputs(2, 1, 2200, 4, 2, 32, config)
  scale = _common.resolve_scale(None, q)
  _, lse = jax.jit(lambda q, k_cmp: nsa_jax.compressed_attention(
      q, k_cmp, jnp.zeros(k_cmp.shape, k_cmp.dtype), config=config, scale=scale,
      impl="xla"))(q, k_cmp)
  given = select_blocks(q, k_cmp, sizes=selection_sizes(config), scale=scale, interpret=True, lse=lse)
  assert_same_selection(given, q, k_cmp, config, scale)


def test_reference_given_lse():
  """select_blocks_xla with the compressed branch's lse equals without it.

  float64, so that exp(s - lse) and the softmax agree far below any score gap;
  T = 300 spans two query chunks of the reference. A misshapen lse is refused.
  """
  config = SMALL
  q, k_cmp = random_inputs(2, 2, 300, 4, 2, 16, config, jnp.float64)
  v_cmp = jnp.zeros(k_cmp.shape, k_cmp.dtype)

  @jax.jit   # one compile for the three calls, not one per primitive op by op
  def both(q, k_cmp, v_cmp):
    _, lse = nsa_jax.compressed_attention(q, k_cmp, v_cmp, config=config, impl="xla")
    return (lse, nsa_jax.select_blocks(q, k_cmp, config=config, impl="xla", lse=lse),
            nsa_jax.select_blocks(q, k_cmp, config=config, impl="xla"))
  lse, got, want = both(q, k_cmp, v_cmp)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match="lse.shape"):
    nsa_jax.select_blocks(q, k_cmp, config=config, impl="xla", lse=lse[:, 1:])


@pytest.mark.parametrize("T, t0, block_k", [(150, 77, 16), (256, 192, 32)])
def test_packed_rows_and_query_offset(T, t0, block_k):
  """Packed rows (doc_start; documents at 0, 48, 112 and a row ending inside
  a selection block), with the kernel's own lse (pass 1) and with the compressed
  branch's: the selection of the reference on packed rows, near-ties apart. And with a
  query offset (context parallelism, #23): the rows from t0 alone, at positions from a
  traced q_offset, select exactly what they select in the whole (T = 256: a slice of
  4 selection blocks at the end of 16, whose key chunks reach past the 4 blocks of its own
  length: the kernel sizes them by the whole sequence's)."""
  config = SMALL
  q, k_cmp = random_inputs(3, 1, T, 4, 2, 32, config)
  segment_ids = jnp.asarray(np.repeat([0, 1, 2], [48, 64, T - 112])[None], jnp.int32)
  doc_start = segments.document_starts(segment_ids)
  scale = _common.resolve_scale(None, q)
  _, lse = jax.jit(lambda q, k_cmp: nsa_jax.compressed_attention(
      q, k_cmp, jnp.zeros(k_cmp.shape, k_cmp.dtype), config=config, scale=scale,
      impl="xla", segment_ids=segment_ids))(q, k_cmp)
  kw = dict(sizes=selection_sizes(config), scale=scale, interpret=True,
            tiles=Tiles(block_q=16, block_k=block_k))
  for given in (None, lse):
    whole = select_blocks(q, k_cmp, **kw, lse=given, doc_start=doc_start)
    assert_same_selection(whole, q, k_cmp, config, scale, doc_start=doc_start)
    part = jax.jit(lambda q, lse, q0: select_blocks(q, k_cmp, **kw, lse=lse,
                                                    doc_start=doc_start[:, t0:], q_offset=q0))(
        q[:, t0:], None if given is None else given[:, t0:], jnp.int32(t0))
    np.testing.assert_array_equal(np.sort(part, -1), np.sort(whole[:, t0:], -1))


@pytest.mark.parametrize("field, value", [("block_q", 8), ("block_k", 48),
                                          ("num_warps", 3), ("num_stages", 0)])
def test_tiles_reject_bad_values(field, value):
  with pytest.raises(ValueError, match=f"Tiles.{field}={value}"):
    Tiles(**{field: value})
