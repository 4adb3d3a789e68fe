"""The per-block lse kernel of the distillation's teacher (pallas_kernels/block_lse.py) in
interpret mode against its reference `block_lse_xla`, and the distillation loss on it
against the loss on the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig
from nsa_jax.ops.distill import block_lse_xla, selection_distill_loss
from pallas_kernels.block_lse import block_lse
from tests import rand


@pytest.mark.parametrize("B, R, T, HQ, HKV, Dk, block, dtype, packed", [
    (2, 77, 77, 4, 2, 24, 16, jnp.float32, False),   # T and R off the tiles, Dk padded
    (1, 40, 100, 2, 2, 192, 24, jnp.float32, True),  # G = 1, Dk = 128 + 64, 24-key blocks
    (1, 33, 12, 16, 1, 16, 16, jnp.bfloat16, False),  # G = 16, T < block
])
def test_matches_reference(B, R, T, HQ, HKV, Dk, block, dtype, packed):
  """Rows at positions in any order, some past T (they see every key), documents starting
  anywhere; -inf exactly where a row sees no key of the block."""
  ks = rand.split(rand.key(R), 3)
  q = rand.normal(ks[0], (B, R, HQ, Dk), dtype)
  k = rand.normal(ks[1], (B, T, HKV, Dk), dtype)
  positions = rand.randint(ks[2], (R,), 0, T + 8)
  doc_start = rand.randint(ks[1], (B, R), 0, T // 2) if packed else None
  got = block_lse(q, k, positions, block=block, scale=0.3, interpret=True,
                  doc_start=doc_start)
  want = jax.jit(block_lse_xla, static_argnums=(3, 4, 5))(
      q, positions, k, 0.3, block, -(-T // block), doc_start)
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  seen = ~np.isinf(want)
  assert seen.any() and (T < block or (~seen).any())
  # Both accumulate the 16-bit or float32 products in float32, in different orders.
  np.testing.assert_allclose(got[seen], want[seen], rtol=1e-5, atol=1e-5)


def test_distillation_loss_on_the_kernel_matches_the_reference():
  """The loss with the teacher on the kernel (packed rows, a query stride) equals the
  loss on the reference, and so does its gradient."""
  config = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=4,
                     window=16)
  T, HQ, HKV, Dk = 150, 4, 2, 16
  ks = rand.split(rand.key(0), 3)
  q = rand.normal(ks[0], (2, T, HQ, Dk), jnp.float32)
  k_cmp = rand.normal(ks[1], (2, config.num_compressed(T), HKV, Dk), jnp.float32)
  k_slc = rand.normal(ks[2], (2, T, HKV, Dk), jnp.float32)
  segment_ids = jnp.asarray(np.repeat([[0, 1]], [96, T - 96], axis=1), jnp.int32).repeat(2, 0)

  @jax.jit
  def loss_and_grad(q, k_cmp):
    return [jax.value_and_grad(
        lambda q, k: selection_distill_loss(q, k, k_slc, config=config, segment_ids=segment_ids,
                                            query_chunk=32, query_stride=2, impl=impl),
        argnums=(0, 1))(q, k_cmp) for impl in ("pallas", "xla")]

  (got, got_grads), (want, want_grads) = loss_and_grad(q, k_cmp)
  assert want > 0
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
