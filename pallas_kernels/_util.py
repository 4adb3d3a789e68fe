"""Helpers shared by the Pallas kernels: integer arithmetic, padding, the float32 dot, the
dtypes the kernels take, the shared memory a kernel's tiles may use on this device, and the
name of what a kernel's forward keeps for its backward.

Nothing here knows NSA: the kernels take sizes (ints), never `nsa_jax.NSAConfig`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

KIB = 1024
# Shared memory one Triton program may allocate, by compute capability (CUDA's
# "maximum shared memory per block, opt-in"): Hopper and Blackwell datacenter
# parts 227 KiB, A100 (sm80) and Orin 163 KiB, the consumer parts of sm86 / sm89
# / sm120 99 KiB. Elsewhere (older GPUs) a conservative 64 KiB.
SHARED_MEMORY = {(9, 0): 227 * KIB, (10, 0): 227 * KIB, (10, 3): 227 * KIB,
                 (8, 0): 163 * KIB, (8, 7): 163 * KIB,
                 (8, 6): 99 * KIB, (8, 9): 99 * KIB, (12, 0): 99 * KIB}
DEFAULT_SHARED_MEMORY = 64 * KIB
HOPPER_SHARED_MEMORY = SHARED_MEMORY[(9, 0)]
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Shared memory a kernel takes beyond its tiles (reductions, layout conversions), in the
# kernels' estimates.
SCRATCH_BYTES = 4096
# The `checkpoint_name` of what a kernel's forward keeps for its backward and would cost
# a kernel call to make again: its outputs, their lse and its index plans (`saved`). Under
# a `jax.checkpoint` whose policy saves this name alone, those are kept and the kernel's
# inputs (q, k, v: cheap to recompute from their projections) are not.
SAVED = "kernel_saved"


def saved(tree):
  """`tree`'s arrays named `SAVED` (identities: values and gradients unchanged)."""
  return jax.tree.map(lambda x: checkpoint_name(x, SAVED), tree)


def cdiv(a, b: int):
  """ceil(a / b) for a >= 0: python ints, or traced integers."""
  return (a + b - 1) // b


def next_pow2(x: int, at_least: int = 1) -> int:
  """Smallest power of two >= max(x, at_least)."""
  return max(at_least, 1 << max(0, x - 1).bit_length())


def is_pow2(x) -> bool:
  return isinstance(x, int) and x >= 1 and x & (x - 1) == 0


def div(a, b: int):
  """a // b for a traced non-negative int32 `a` (lax.div: x64-safe, no floor fix-up in Triton)."""
  return lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def div_up(a, b: int):
  """ceil(a / b) for a traced non-negative int32 `a` (`div`)."""
  return div(a + (b - 1), b)


def pad_to(x, shape, value=0):
  """x padded at the end of each axis up to `shape` (no copy when it already has it)."""
  if x.shape == tuple(shape):
    return x
  return jnp.pad(x, [(0, n - m) for m, n in zip(x.shape, shape)], constant_values=value)


def pow2_parts(size: int) -> list[tuple[int, int]]:
  """(start, length) pieces of [0, size), size a multiple of 16, in powers of 2 >= 16.

  Triton arrays must have power-of-2 sizes: Dk = 192 is read as 128 + 64
  instead of being padded to 256.
  """
  parts, start = [], 0
  for bit in reversed(range(size.bit_length())):
    if size & (1 << bit):
      parts.append((start, 1 << bit))
      start += 1 << bit
  return parts


def dot(a, b, *, interpret: bool, contract=(1, 0)):
  """2-D matmul with float32 accumulation. Float32 inputs keep float32 accuracy:
  3-pass TF32 on the GPU's tensor cores (plain float32 dots spill registers badly in
  Triton), exact float32 in interpret mode; 16-bit inputs run at the tensor cores' rate."""
  if a.dtype != jnp.float32:
    precision = lax.Precision.DEFAULT
  elif interpret:
    precision = lax.Precision.HIGHEST
  else:
    precision = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def kv_width(Dk: int, Dv: int, itemsize: int) -> int:
  """Elements of a row pair of widths Dk and Dv (K and V, q and dO) as Triton stages
  them in shared memory for the dots: Dk + Dv, but with float32 inputs (TF32 dots)
  both at the wider of the two (measured: Triton's allocation of the kernels for sm90,
  experiments/shared_memory.py)."""
  return 2 * max(Dk, Dv) if itemsize == 4 else Dk + Dv


def dtype_unsupported(dtype) -> str | None:
  """Why the kernels cannot take inputs of `dtype` (they compute in float32), or None."""
  if jnp.dtype(dtype) not in KERNEL_DTYPES:
    return f"dtype {jnp.dtype(dtype).name} is not float32, bfloat16 or float16"
  return None


def fit_tiles(tiles, used: Callable[[Any], int], halve: Sequence[tuple[str, int]]):
  """`tiles` with the fields of `halve` ((name, floor), in order) halved, each down to its
  floor, until `used(tiles)` bytes fit the device's shared memory (`shared_memory_budget`);
  unchanged where they fit, None where nothing left to halve makes them fit."""
  budget = shared_memory_budget()
  while used(tiles) > budget:
    name = next((n for n, floor in halve if getattr(tiles, n) > floor), None)
    if name is None:
      return None
    tiles = dataclasses.replace(tiles, **{name: getattr(tiles, name) // 2})
  return tiles


def shared_memory_budget() -> int:
  """Bytes of shared memory one program may use on the default device (`SHARED_MEMORY`).

  Off a GPU (interpret mode) the tiles are chosen for Hopper's budget, so that the CPU
  tests run the tiles an H100 / H200 runs."""
  device = jax.devices()[0]
  if device.platform != "gpu":
    return HOPPER_SHARED_MEMORY
  try:
    major, minor = (int(x) for x in str(device.compute_capability).split("."))
  except (AttributeError, ValueError):
    return DEFAULT_SHARED_MEMORY
  return SHARED_MEMORY.get((major, minor), DEFAULT_SHARED_MEMORY)
