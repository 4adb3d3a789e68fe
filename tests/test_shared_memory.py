"""The kernels' tiles fit a GPU's shared memory on every head shape a model uses (issue #18).

Each Pallas kernel estimates the shared memory of its tiles (`shared_memory` in
pallas_kernels/; checked against Triton's own allocation by
experiments/shared_memory.py) and its default tiles shrink until they fit the device.
On the CPU the tiles are chosen for Hopper's 227 KiB, what the H100 / H200 run:
- for every shape of the matrix (Dk/Dv 32 .. 256, G 1 .. 16, bf16 / f32 / f16) the
  tiles each op picks fit, Config A's and B's tiles are the ones they ran with;
- the tiles the code picked before (H200: `Shared memory size limit exceeded`) do not;
- the kernels still match the reference with the shrunk tiles (interpret mode).
"""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import NSAConfig
from nsa_jax.ops import dispatch
from nsa_jax.ops._common import selection_sizes
from pallas_kernels import (_flash_tiles, _util, block_lse, compressed_attention, decode_attention,
                            select_blocks, window_attention)
from pallas_kernels.selected_attention import choice as selected_choice
from pallas_kernels.selected_attention import tiles as selected_tiles
from tests import rand

BUDGET = _util.HOPPER_SHARED_MEMORY
CONFIG = NSAConfig()
HEADS = [(32, 32), (64, 64), (96, 96), (128, 128), (192, 128), (256, 256)]
MATRIX = list(itertools.product(HEADS, [1, 2, 4, 8, 16], ["bfloat16", "float32", "float16"]))


def _arrays(Dk, Dv, G, dtype, T=512, HKV=4):
  x = lambda H, D, S=T: jax.ShapeDtypeStruct((1, S, H, D), jnp.dtype(dtype))
  return x(HKV * G, Dk), x(HKV, Dk), x(HKV, Dv)


def _selected_tilings(q, k, v):
  """{name: fitted Tiles} of the tilings selected_attention runs for q, k, v from its
  default tiles: query tiles (by default at G = 16, or forced) and block-major (by
  default at G <= 8, or forced) where its tiles fit."""
  tiles = selected_tiles.default_tiles(q, v)
  out = {}
  for name, kernels in (("query tiles", selected_choice.QUERY_TILES),
                        ("block-major", selected_choice.BLOCK_MAJOR)):
    forced = dataclasses.replace(tiles, block_major=name == "block-major")
    fitted = selected_choice.fit_tiles_for(q, v, CONFIG.select_block, forced, kernels)
    if fitted is not None:
      out[name] = fitted
  return out


@pytest.mark.parametrize("heads,G,dtype", MATRIX, ids=lambda x: str(x))
def test_every_kernel_fits_on_every_shape(heads, G, dtype):
  (Dk, Dv), isz = heads, jnp.dtype(dtype).itemsize
  q, k, v = _arrays(Dk, Dv, G, dtype)
  for kernel in (window_attention, compressed_attention):
    tiles = kernel.default_tiles(q, k, v)
    assert max(_flash_tiles.shared_memory(tiles, G, Dk, Dv, isz).values()) <= BUDGET
  sizes = selection_sizes(CONFIG)
  for lse_given in (False, True):
    tiles = select_blocks.default_tiles(q, sizes, lse_given)
    assert select_blocks.shared_memory(tiles, sizes, Dk, isz) <= BUDGET
  tiles = block_lse.default_tiles(q, CONFIG.select_block)
  assert block_lse.shared_memory(tiles, CONFIG.select_block, Dk, isz) <= BUDGET
  tilings = _selected_tilings(q, k, v)
  assert "query tiles" in tilings
  for name, tiles in tilings.items():
    kernels = selected_choice.BLOCK_MAJOR if name == "block-major" else selected_choice.QUERY_TILES
    need = selected_tiles.shared_memory(tiles, G, Dk, Dv, CONFIG.select_block, isz)
    assert max(need[k] for k in kernels) <= BUDGET, (name, need)
  if _util.is_pow2(Dk) and _util.is_pow2(Dv):   # the decode kernel's shapes
    assert decode_attention.shared_memory(G, Dk, Dv, 64, isz) <= BUDGET
  for op in (window_attention, compressed_attention):
    assert op.unsupported(q, k, v, **({"window": 512} if op is window_attention else {})) is None


def test_config_a_and_b_keep_the_tiles_they_ran_with():
  """bf16, G = 16: Config A (128/128) and B (192/128) keep the tiles measured on the
  H200 (no kernel's estimate is over the budget there), the G sweep's block-major
  kernels at 128/128 too."""
  for Dk, G in [(128, 16), (192, 16), (128, 1), (128, 4)]:
    q, k, v = _arrays(Dk, 128, G, "bfloat16")
    default = selected_tiles.default_tiles(q, v)
    for name, tiles in _selected_tilings(q, k, v).items():
      want = dict(rows=default.rows, dkv_rows=default.dkv_rows, block_rows=default.block_rows)
      if Dk == 192 and name == "block-major":
        continue    # did not fit before (the next test)
      assert {f: getattr(tiles, f) for f in want} == want, (Dk, G, name)
  q, k, v = _arrays(128, 128, 16, "bfloat16")
  assert window_attention.default_tiles(q, k, v) == window_attention.TILES
  assert compressed_attention.default_tiles(q, k, v) == compressed_attention.TILES
  assert select_blocks.default_tiles(q, selection_sizes(CONFIG), True) == select_blocks.WITH_LSE


# The tiles the code picked before the estimates, for the shapes that failed to
# compile on an H200 (issue #18: requested 279,680 - 393,216 bytes of 232,448).
BEFORE_BF16 = selected_tiles.Tiles(num_warps=2)                       # heads over 128
BEFORE_F32 = selected_tiles.Tiles(dkv_rows=64, num_warps=2, num_stages=1)
FAILED = [  # (Dk, Dv, G, dtype, tiles before)
    (192, 128, 4, "bfloat16", BEFORE_BF16), (192, 128, 2, "bfloat16", BEFORE_BF16),
    (192, 128, 4, "float32", BEFORE_F32), (192, 128, 2, "float32", BEFORE_F32),
    (256, 256, 1, "bfloat16", BEFORE_BF16), (256, 256, 1, "float32", BEFORE_F32)]


@pytest.mark.parametrize("Dk,Dv,G,dtype,before", FAILED, ids=lambda x: str(x))
def test_the_tiles_that_failed_are_over_the_budget(Dk, Dv, G, dtype, before):
  """The block-major dK/dV kernel (compiled for G <= 8) with the old tiles is over
  the budget; the fitted tiles are not."""
  isz = jnp.dtype(dtype).itemsize
  need = selected_tiles.shared_memory(before, G, Dk, Dv, CONFIG.select_block, isz)
  assert need["block_dkv"] > BUDGET
  assert selected_tiles.default_tiles(*_arrays(Dk, Dv, G, dtype)[::2]) == before


def test_the_compressed_tiles_that_failed_are_over_the_budget():
  """Compressed attention, Dk = Dv = 256, bf16: the old forward tiles (3 stages of
  64 keys) are over the budget; the fitted ones drop a stage."""
  q, k, v = _arrays(256, 256, 1, "bfloat16")
  before = dataclasses.replace(compressed_attention.TILES, bwd_block_m=32)
  assert _flash_tiles.shared_memory(before, 1, 256, 256, 2)["fwd"] > BUDGET
  assert compressed_attention.default_tiles(q, k, v) == dataclasses.replace(before, num_stages=2)


def test_too_small_a_device_is_refused_with_the_sizes(monkeypatch):
  """Where even the smallest tiles do not fit (a device with little shared memory),
  the ops' Pallas entries say why, and "auto" would take the reference."""
  monkeypatch.setattr(_util, "shared_memory_budget", lambda: 32 * 1024)
  q, k, v = _arrays(256, 256, 4, "float32")
  why = dispatch.SUPPORTED["selected_attention"]["pallas"](
      dispatch.Call(dict(q=q, k=k, v=v), CONFIG, True))
  assert why and "Dk=256, Dv=256" in why and "32768" in why
  assert "Dk=256" in window_attention.unsupported(q, k, v, window=512)


SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=4,
                  window=16)


@pytest.mark.parametrize("B,T,HKV,G,Dk,Dv", [(2, 45, 2, 4, 192, 128), (1, 37, 2, 1, 256, 256)],
                         ids=["Dk192-Dv128-G4", "Dk256-G1"])
def test_selected_matches_the_reference_with_the_fitted_tiles(B, T, HKV, G, Dk, Dv):
  """The heads whose tiles are shrunk: the query-tile and block-major tilings fitted
  for bf16 forced one by one, in float32 (exact in interpret mode), forward and
  gradients against the reference, T not a multiple of any tile or block."""
  from pallas_kernels.selected_attention import selected_attention
  from nsa_jax.ops.selected import selected_attention_xla
  ks = rand.split(rand.key(Dk), 6)
  q = rand.normal(ks[0], (B, T, HKV * G, Dk), jnp.float32)
  k = rand.normal(ks[1], (B, T, HKV, Dk), jnp.float32)
  v = rand.normal(ks[2], (B, T, HKV, Dv), jnp.float32)
  ct = rand.normal(ks[3], (B, T, HKV * G, Dv), jnp.float32)
  k_cmp = rand.normal(ks[4], (B, SMALL.num_compressed(T), HKV, Dk), jnp.float32)
  block_idx = nsa_jax.select_blocks(q, k_cmp, config=SMALL, impl="xla")
  scale = Dk ** -0.5
  ref = jax.vjp(lambda *a: selected_attention_xla(*a, block_idx, config=SMALL, scale=scale),
                q, k, v)
  want = (ref[0], *ref[1](ct))
  # The tiles fitted for bf16 (block-major kept, with shrunk dK/dV steps), run in float32.
  bf16 = [jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in (q, k, v)]
  tilings = _selected_tilings(*bf16)
  assert tilings["block-major"].dkv_rows < selected_tiles.default_tiles(*bf16[::2]).dkv_rows
  for tiles in tilings.values():
    run = jax.jit(lambda q, k, v, tiles=tiles: (lambda o, vjp: (o, *vjp(ct)))(*jax.vjp(
        lambda *a: selected_attention(*a, block_idx, block=SMALL.select_block, scale=scale,
                                      interpret=True, tiles=tiles),
        q, k, v)))
    for name, got, ref_x in zip(("o", "dq", "dk", "dv"), run(q, k, v), want):
      np.testing.assert_allclose(got, ref_x, rtol=1e-4, atol=1e-4, err_msg=name)
