"""Runs a script of experiments/ in its --small mode, in a subprocess (its own jax
settings, as on the device machine): tests/test_experiments_smoke.py and the
`bench_kernels_small` fixture of tests/conftest.py."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA's CPU backend without its optimization passes (set for the whole run by
# tests/conftest.py): most tests compile many small programs and run each a few times.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def optimized(env: dict) -> dict:
  """env without FAST_COMPILE in XLA_FLAGS: for a process that trains for hundreds of steps,
  where optimized code pays for its longer compiles (experiments/PERF_NOTES.md, "Test suite")."""
  return dict(env, XLA_FLAGS=env.get("XLA_FLAGS", "").replace(FAST_COMPILE, "").strip())


def run_script(name, args, out_dir, **env_vars):
  """`python -m experiments.<name> --small --out OUT_DIR *args`; must exit 0. Returns its
  stdout."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUMPY_RANK_PROMOTION="raise", **env_vars)
  env.pop("OUT", None)
  proc = subprocess.run(
      [sys.executable, "-m", f"experiments.{name}", "--small",
       "--out", str(out_dir), *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout
