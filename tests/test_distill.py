"""Selection distillation loss (nsa_jax/ops/distill.py) against the dense float64 oracle
of tests/oracle.py, and its gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nsa_jax import NSAConfig
from nsa_jax.ops import segments
from nsa_jax.ops.distill import selection_distill_loss
from tests import oracle, rand

SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=4,
                  window=16)
# l = l', no initial block, one local block.
ODD = NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=3,
                num_initial=0, num_local=1, window=24)


def inputs(seed, B, T, HQ, HKV, Dk, config, dtype=jnp.float64):
  ks = rand.split(rand.key(seed), 3)
  n = lambda k, s: rand.normal(k, s, dtype)
  return (n(ks[0], (B, T, HQ, Dk)), n(ks[1], (B, config.num_compressed(T), HKV, Dk)),
          n(ks[2], (B, T, HKV, Dk)))


@pytest.mark.parametrize("group_score", ["sum", "max"])
@pytest.mark.parametrize("T, HQ, HKV, config, chunk, packed", [
    (77, 4, 2, SMALL, 32, False),     # 3 chunks, the last partial
    (61, 4, 4, ODD, 16, False),       # G = 1
    (150, 6, 2, SMALL, 64, True),     # documents at 0 and 96
])
def test_matches_dense_oracle(T, HQ, HKV, config, chunk, packed, group_score):
  config = dataclasses.replace(config, group_score=group_score)
  q, k_cmp, k_slc = inputs(T, 2, T, HQ, HKV, 8, config)
  segment_ids = (jnp.asarray(np.repeat([[0, 1]], [96, T - 96], axis=1), jnp.int32)
                 .repeat(2, axis=0) if packed else None)
  scale = 0.4
  got = selection_distill_loss(q, k_cmp, k_slc, config=config, scale=scale,
                               segment_ids=segment_ids, query_chunk=chunk)
  doc_start = None if segment_ids is None else segments.document_starts(segment_ids)
  want = oracle.selection_distill_loss(q, k_cmp, k_slc, config, scale, doc_start)
  assert want > 0
  np.testing.assert_allclose(float(got), want, rtol=1e-10)


@pytest.mark.parametrize("T, chunk, stride, packed", [
    (150, 32, 2, True),    # 5 chunks: 0, 2 and 4 (the last, partial) count
    (77, 32, 3, False),    # 3 chunks: the last alone, partial
    (96, 32, 4, False),    # stride past the chunks: the last
])
def test_query_stride_is_the_loss_over_every_kth_chunk(T, chunk, stride, packed):
  """query_stride k: the oracle's loss over the queries of every k-th chunk, counted back
  from the last (the mean over those queries alone)."""
  q, k_cmp, k_slc = inputs(T + stride, 2, T, 4, 2, 8, SMALL)
  segment_ids = (jnp.asarray(np.repeat([[0, 1]], [96, T - 96], axis=1), jnp.int32)
                 .repeat(2, axis=0) if packed else None)
  got = selection_distill_loss(q, k_cmp, k_slc, config=SMALL, scale=0.4,
                               segment_ids=segment_ids, query_chunk=chunk, query_stride=stride)
  n = -(-T // chunk)
  queries = [t for t in range(T) if (n - 1 - t // chunk) % stride == 0]
  doc_start = None if segment_ids is None else segments.document_starts(segment_ids)
  want = oracle.selection_distill_loss(q, k_cmp, k_slc, SMALL, 0.4, doc_start, queries)
  assert want > 0
  np.testing.assert_allclose(float(got), want, rtol=1e-10)


def test_gradient_reaches_q_and_k_cmp_only():
  """Nonzero gradient for q and k_cmp (the student), none for k_slc (the teacher);
  float32 inputs, where every gradient is finite; float64 numerical check of k_cmp's. With no
  free candidate anywhere (T < 3 blocks), the loss and its gradients are 0."""
  config = dataclasses.replace(SMALL, group_score="max")
  q, k_cmp, k_slc = inputs(0, 1, 70, 4, 2, 8, config, jnp.float32)
  loss = lambda *a: selection_distill_loss(*a, config=config, query_chunk=32)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k_cmp, k_slc)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  dq, dk_cmp, dk_slc = map(np.asarray, grads)
  assert np.abs(dq).max() > 0 and np.abs(dk_cmp).max() > 0
  np.testing.assert_array_equal(dk_slc, 0)
  none_free = jax.value_and_grad(loss, argnums=(0, 1))(*inputs(3, 1, 40, 4, 2, 8, config,
                                                                jnp.float32))
  for x in jax.tree.leaves(none_free):
    np.testing.assert_array_equal(x, 0)
  # Numerically in k_cmp alone: q moves the teacher too, whose gradient is stopped.
  q, k_cmp, k_slc = inputs(1, 1, 70, 4, 2, 8, config)
  f = jax.jit(lambda k: loss(q, k, k_slc))
  assert f(k_cmp) > 0
  check_grads(f, (k_cmp,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_bad_inputs_raise_value_errors():
  q, k_cmp, k_slc = inputs(2, 1, 40, 4, 2, 8, SMALL, jnp.float32)
  with pytest.raises(ValueError, match="query_chunk=0"):
    selection_distill_loss(q, k_cmp, k_slc, config=SMALL, query_chunk=0)
  with pytest.raises(ValueError, match="query_stride=0"):
    selection_distill_loss(q, k_cmp, k_slc, config=SMALL, query_stride=0)
  with pytest.raises(ValueError, match="k_cmp"):
    selection_distill_loss(q, k_cmp[:, 1:], k_slc, config=SMALL)
  with pytest.raises(ValueError, match="k_slc"):
    selection_distill_loss(q, k_cmp, k_slc[:, 1:], config=SMALL)
