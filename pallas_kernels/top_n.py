"""Top-n of short score rows in Pallas (Triton lowering): the ranking step of decoding.

Paper §3.3.2, Eq. 11: each KV group keeps the n selection blocks of highest
importance. In a decode step (`pallas_kernels/decode_attention.py`) the block
scores are one row of Ts = T / l' values per (sequence, KV group), and XLA's
`lax.top_k` on such rows was a large share of the step (H200, T = 64k: 38 us
at batch 1, 62 us at batch 32, against 10 us / 118 us for the three attention
kernels). Here one program takes one row whole (Ts padded to a power of 2) on
one warp and runs n passes of "row max, lowest index holding it, knock it
out": 2n warp-shuffle reductions, no sort, no shared memory or barrier (H200:
5.6 us for n = 16, Ts = 1024; 8 rows on 4 warps per program took 12.8 us,
latency-bound on cross-warp reductions).

Semantics are `lax.top_k`'s as `nsa_jax.ops.selection.rank_blocks` uses them:
values in descending order, ties to the lower index; only the index paired
with a -inf value is unspecified (a taken column is knocked out to -inf, so it
may come back), and rank_blocks turns those slots into -1. Reference:
`lax.top_k` (tests/test_decoding.py compares the two, ties and infinities
included).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

def _kernel(x_ref, values_ref, index_ref, *, n: int):
  live = x_ref[...]                                        # [1, C] float32
  col = lax.broadcasted_iota(jnp.int32, live.shape, 1)
  slot = lax.broadcasted_iota(jnp.int32, values_ref.shape, 1)

  def pick(i, carry):
    live, values, index = carry
    best = live.max(axis=1)
    at = jnp.where(live == best[:, None], col, live.shape[1]).min(axis=1)   # lowest such column
    values = jnp.where(slot == i, best[:, None], values)
    index = jnp.where(slot == i, at[:, None], index)
    return jnp.where(col == at[:, None], -jnp.inf, live), values, index

  init = (live, jnp.full(values_ref.shape, -jnp.inf, jnp.float32),
          jnp.zeros(index_ref.shape, jnp.int32))
  _, values_ref[...], index_ref[...] = lax.fori_loop(0, n, pick, init)


@functools.partial(jax.jit, static_argnames=("n", "interpret"))
def top_n(x, n: int, *, interpret: bool = False):
  """`lax.top_k(x, n)` for float rows x [..., C] with C >= n: (values, int32 indices).

  The index of a -inf value is unspecified (see the module docstring).
  """
  *lead, C = x.shape
  if n > C:
    raise ValueError(f"top_n: n={n} must be <= the row length C={C}")
  R = math.prod(lead)
  Cp, npad = pl.next_power_of_2(C), pl.next_power_of_2(n)
  # Padded columns sit at -inf past every real column: taken only once all
  # real ones are, which n <= C rules out (or at -inf, where indices are free).
  xp = jnp.pad(x.reshape(R, C).astype(jnp.float32), [(0, 0), (0, Cp - C)],
               constant_values=-jnp.inf)
  values, index = pl.pallas_call(
      functools.partial(_kernel, n=n),
      grid=(R,),
      in_specs=[pl.BlockSpec((1, Cp), lambda r: (r, 0))],
      out_specs=[pl.BlockSpec((1, npad), lambda r: (r, 0))] * 2,
      out_shape=[jax.ShapeDtypeStruct((R, npad), jnp.float32),
                 jax.ShapeDtypeStruct((R, npad), jnp.int32)],
      compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
      interpret=interpret, name="nsa_top_n",
  )(xp)
  return (values[:, :n].astype(x.dtype).reshape(*lead, n),
          index[:, :n].reshape(*lead, n))
