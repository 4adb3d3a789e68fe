"""JAX's persistent compilation cache for a training run (`TrainConfig.compile_cache`):
a later start of the same configuration reads its programs instead of compiling them.
On several hosts JAX writes entries from its process 0 only; every process reads them
(a directory on a shared filesystem)."""
from __future__ import annotations

import contextlib
import tempfile

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from nsa_jax.train_config import TrainConfig

CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                 "jax_persistent_cache_min_entry_size_bytes")


@contextlib.contextmanager
def compile_cache(cfg: TrainConfig):
  """Within: JAX's persistent compilation cache in `cfg.compile_cache_dir` (none: JAX's own
  settings), every program cached however small or quick to compile; the settings before are
  back after. Raises ValueError, before anything compiles, when the directory cannot be written.
  """
  path = cfg.compile_cache_dir
  if path is None:
    yield
    return
  try:
    path.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=path).close()
  except OSError as err:
    raise ValueError(f"compile_cache={cfg.compile_cache!r}: cannot write to {path} "
                     f"({err.strerror}); pass --compile_cache DIR (a writable directory) or "
                     f"--compile_cache '' (no cache)") from None
  before = {name: getattr(jax.config, name) for name in CACHE_OPTIONS}
  values = (str(path.absolute()), 0.0, -1)   # -1: no size limit, and JAX does not raise it
  try:
    for name, value in zip(CACHE_OPTIONS, values):
      jax.config.update(name, value)
    jax_cache.reset_cache()   # JAX checks the directory once: again, with this one
    yield
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
    jax_cache.reset_cache()
