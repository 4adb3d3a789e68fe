"""Runs a check script on 8 CPU devices in a subprocess (the device count must be set before
jax starts) and returns the JSON object it prints last: tests/test_sharding.py and
tests/test_context.py assert on what tests/sharding_check.py and tests/context_check.py
measure."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_check(script: str, out: pathlib.Path) -> dict:
  """`python tests/<script> OUT` with 8 host devices; its last stdout line, parsed."""
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env = {**os.environ, "XLA_FLAGS": flags.strip(),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tests" / script), str(out)],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_restored(restore: dict, targets) -> None:
  """A checkpoint saved on one mesh, restored onto each target (`restore[target]` as the check
  scripts measure it): the target held other values before, the checkpoint's exactly after,
  placed on the target's devices."""
  for target in targets:
    got = restore[target]
    assert got["max_abs_diff_before"] > 0.1, target
    assert got["max_abs_diff"] == 0.0, target
    assert got["on_target"], target
