"""Random test inputs drawn by NumPy, with jax.random's call shapes (key, split, normal,
uniform). jax.random compiles a program per shape and dtype on first use (~0.2 s each on
the CPU: a fifth of a kernel test file's compile time, experiments/PERF_NOTES.md "Test
suite"); NumPy compiles nothing. A key is a tuple of ints, the seed of NumPy's generator."""
import jax.numpy as jnp
import numpy as np


def key(seed: int) -> tuple:
  return (seed,)


def split(key: tuple, num: int = 2) -> list[tuple]:
  return [key + (i,) for i in range(num)]


def normal(key: tuple, shape, dtype=None):
  """dtype None: jax's default float (float64 with jax_enable_x64, as the tests set)."""
  return _array(np.random.default_rng(key).standard_normal(shape), dtype)


def uniform(key: tuple, shape, dtype=None, minval=0.0, maxval=1.0):
  return _array(np.random.default_rng(key).uniform(minval, maxval, shape), dtype)


def randint(key: tuple, shape, minval: int, maxval: int, dtype=jnp.int32):
  return _array(np.random.default_rng(key).integers(minval, maxval, shape), dtype)


def _array(x, dtype):
  """A jax array of x in `dtype`, converted on the host (jnp.asarray would convert with a
  compiled program per shape)."""
  return jnp.asarray(x if dtype is None else np.asarray(x, dtype))
