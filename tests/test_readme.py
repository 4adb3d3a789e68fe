"""The README: its results section is generated from the committed JSON, never typed by hand, and
its Python blocks run as written."""
import os
import re
import subprocess
import sys

from experiments import report


def test_readme_results_are_generated_from_committed_results():
  text = report.render()
  assert "bench_kernels" in text and "| A | 64k | 16 |" in text
  readme = (report.ROOT / "README.md").read_text()
  assert text in readme, "README.md results are stale: run python experiments/report.py"


def test_readme_python_blocks_run():
  """The ```python blocks, in order, in one fresh interpreter on the CPU (each block may use
  what the ones before it defined, as a reader would run them)."""
  readme = (report.ROOT / "README.md").read_text()
  blocks = re.findall(r"^```python\n(.*?)^```", readme, re.S | re.M)
  assert len(blocks) >= 2
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=report.ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
