"""The GPU correctness harness (experiments/gpu_check.py) at its tiny shapes, one run per
mode, on a GPU: the Pallas kernels compiled for the device against the float32 reference.
The full runs (`python -m experiments.gpu_check --matrix`, ...) are the README's; on a
CPU the harness's own smoke tests are in tests/test_experiments_smoke.py."""
import json
import os
import subprocess
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a GPU (the kernels run compiled, not interpreted)")


@pytest.mark.parametrize("mode", ["", "--matrix", "--packed", "--offsets"])
def test_gpu_check_small(tmp_path, mode):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.gpu_check", "--small", *mode.split(),
       "--out", str(tmp_path)],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  [path] = tmp_path.glob("gpu_*.json")
  summary = json.loads(path.read_text())["summary"]
  assert summary["pass"] > 0 and summary["fail"] == summary["error"] == summary["skipped"] == 0, (
      summary)
