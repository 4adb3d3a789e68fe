"""One selection (docs/semantics.md#one-selection; issue #18 point 2): `nsa` selects
exactly the blocks `select_blocks` selects on the same inputs, with the same impl on the
same device.

Both compute p_cmp from the lse of `selection.selection_lse`: `nsa` from its
compressed branch's, `select_blocks` alone by running that branch. Near-tie
inputs (queries of norm ~1e-7: p_cmp uniform to a few ulps, and so are the
block scores) make any rounding difference in that lse flip blocks. Before this
rule, `nsa` passed its branch's lse while `select_blocks` computed its own (the
Pallas kernel in its pass 1, the reference as a softmax): every case below then
selected other blocks on some rows. Pallas kernels run in interpret mode;
cuDNN never runs on a CPU, so its lse (the GPU's bf16 default) is checked by
experiments/gpu_check.py --matrix. Dv != Dk checks that the lse does not
depend on the values' width.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import NSAConfig
from nsa_jax.ops import compressed, selection
from tests import rand

SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=16,
                  num_selected=4, window=16)
NAMES = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")


def near_tie_inputs(key, B, T, HQ, HKV, Dk, Dv, dtype):
  ks = rand.split(key, 8)
  Tc = SMALL.num_compressed(T)
  n = lambda k, s, sd=1.0: (sd * rand.normal(k, s, jnp.float32)).astype(dtype)
  return dict(
      q=n(ks[0], (B, T, HQ, Dk), 1e-7),
      k_cmp=n(ks[1], (B, Tc, HKV, Dk)), v_cmp=n(ks[2], (B, Tc, HKV, Dv)),
      k_slc=n(ks[3], (B, T, HKV, Dk)), v_slc=n(ks[4], (B, T, HKV, Dv)),
      k_win=n(ks[5], (B, T, HKV, Dk)), v_win=n(ks[6], (B, T, HKV, Dv)),
      gates=jax.nn.sigmoid(n(ks[7], (B, T, HQ, 3))))


# (B, T, HQ, HKV, Dk, Dv): T not a multiple of any block, G in {1, 3}, Dv != Dk both ways.
@pytest.mark.parametrize("shape", [(2, 203, 6, 2, 16, 8), (1, 150, 2, 2, 8, 16)], ids=str)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_nsa_selects_what_select_blocks_selects(impl, dtype, shape):
  x = near_tie_inputs(rand.key(0), *shape, jnp.dtype(dtype))
  kw = dict(config=SMALL, impl=impl, interpret=True)
  from_nsa = jax.jit(lambda *a: nsa_jax.nsa(*a, **kw, return_block_idx=True)[1])(
      *(x[n] for n in NAMES))
  alone = jax.jit(lambda q, k: nsa_jax.select_blocks(q, k, **kw))(x["q"], x["k_cmp"])
  np.testing.assert_array_equal(np.sort(from_nsa, axis=-1), np.sort(alone, axis=-1))


@pytest.mark.parametrize("Dv", [8, 512])
def test_nsa_reuses_its_branch_lse_only_where_it_is_the_selections(Dv):
  """The lse `nsa` selects from (`selection_lse` given its compressed branch's
  lse) equals, to the bit, the one `select_blocks` selects from (computed over
  values as wide as the keys). Dv = 512 narrows the Pallas forward's key tiles
  in float32 (`_flash_tiles.fit_tiles`), which changes the lse's rounding: there the
  branch's lse must not be reused."""
  B, T, HQ, HKV, Dk = 1, 90, 2, 1, 32
  ks = rand.split(rand.key(1), 3)
  Tc = SMALL.num_compressed(T)
  q = rand.normal(ks[0], (B, T, HQ, Dk), jnp.float32)
  k_cmp = rand.normal(ks[1], (B, Tc, HKV, Dk), jnp.float32)
  v_cmp = rand.normal(ks[2], (B, Tc, HKV, Dv), jnp.float32)
  kw = dict(config=SMALL, scale=Dk ** -0.5, impl="pallas", interpret=True)
  # Each call its own compiled program (not one compile per op), as nsa and select_blocks
  # are apart.
  branch_lse = jax.jit(lambda q, k_cmp, v_cmp: compressed.compressed_attention(
      q, k_cmp, v_cmp, **kw)[1])(q, k_cmp, v_cmp)
  from_nsa = jax.jit(lambda q, k_cmp, v_cmp, branch_lse: selection.selection_lse(
      q, k_cmp, **kw, branch=(v_cmp, "pallas", branch_lse)))(q, k_cmp, v_cmp, branch_lse)
  alone = jax.jit(lambda q, k_cmp: selection.selection_lse(q, k_cmp, **kw))(q, k_cmp)
  np.testing.assert_array_equal(from_nsa, alone)
