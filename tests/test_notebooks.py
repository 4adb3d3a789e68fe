"""The notebooks under notebooks/ run top to bottom on the CPU, and are committed without outputs.

Each notebook runs with nbclient in a fresh "python3" kernel: jupyter_client starts a kernelspec
whose command is "python" with the interpreter running these tests, so the kernel sees the same
packages; the repository goes on its PYTHONPATH. A cell that raises fails the test.

Committed notebooks carry no outputs (and no execution counts): outputs would go stale the moment
the code changes, so a reader always gets what a run produces. Every cell has an id (nbformat 4.5),
and a run prints no warning.

`03_performance` reads the GPU benchmark's JSON; besides the run against whatever results are
committed, it also runs against the output of `experiments/bench_kernels.py --small` on the CPU, so
its plotting code is exercised against the script's real schema even before GPU results exist.
"""
import glob
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.scripts import optimized

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
CELL_TIMEOUT_S = 600
PERFORMANCE = os.path.join(NOTEBOOK_DIR, "03_performance.ipynb")
# Notebooks that train models for hundreds of steps: run-time bound, they run with XLA's
# optimizations (the others, compile-bound, without: tests/conftest.py).
TRAINS = {"02_what_nsa_attends_to.ipynb"}


def execute(path, **env):
  """Runs the notebook at `path` in a fresh kernel (cwd: notebooks/) and returns it, outputs filled."""
  nb = nbformat.read(path, as_version=4)
  kernel_env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
  if os.path.basename(path) in TRAINS:
    kernel_env = optimized(kernel_env)
  kernel_env["PYTHONPATH"] = os.pathsep.join(
      [REPO] + ([kernel_env["PYTHONPATH"]] if kernel_env.get("PYTHONPATH") else []))
  client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                          resources={"metadata": {"path": NOTEBOOK_DIR}})
  client.execute(env=kernel_env)
  return nb


def outputs(nb):
  """(all printed text, number of images) of an executed notebook."""
  text, images = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      text.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
      images += "image/png" in out.get("data", {})
  return "".join(text), images


def test_the_three_notebooks_exist():
  names = [os.path.basename(p) for p in NOTEBOOKS]
  assert names == ["01_quickstart.ipynb", "02_what_nsa_attends_to.ipynb",
                   "03_performance.ipynb"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs(path):
  raw = json.load(open(path))          # as committed: nbformat.read would fill in missing ids
  assert all("id" in cell for cell in raw["cells"]), f"{path}: cells without an id"
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.cells[0].cell_type == "markdown" and "How to run" in nb.cells[0].source
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (
          f"{os.path.basename(path)} cell {i} carries outputs: strip them before committing "
          f"(after `make notebooks`: .venv/bin/jupyter nbconvert --clear-output --inplace "
          f"{os.path.relpath(path, REPO)})")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_runs_top_to_bottom(path):
  nb = execute(path)
  warnings = [out["text"] for cell in nb.cells for out in cell.get("outputs", [])
              if out.get("name") == "stderr" and "Warning" in out["text"]]
  assert not warnings, warnings
  text, images = outputs(nb)
  name = os.path.basename(path)
  if name.startswith("01"):
    assert "max |y_pallas - y_xla|" in text
  if name.startswith("02"):
    assert "dense weights vs nsa(...)" in text and images >= 5, (images, text[-2000:])
  if name.startswith("03"):
    committed = glob.glob(os.path.join(REPO, "experiments", "results", "bench_kernels_*.json"))
    decode = glob.glob(os.path.join(REPO, "experiments", "results", "bench_decode_*.json"))
    if committed:
      assert images >= 3 and "No benchmark results" not in text, (images, text[-2000:])
    else:
      assert "No benchmark results" in text and images == 0
    if decode:   # one decode figure (latency, breakdown) per results file
      assert "No decode results" not in text and images >= 3 * bool(committed) + len(decode)
    else:
      assert "No decode results" in text


def test_performance_plots_a_real_results_file(bench_kernels_small):
  results, _ = bench_kernels_small
  text, images = outputs(execute(PERFORMANCE, NSA_BENCH_RESULTS=str(results)))
  assert "bench_kernels_cpu.json" in text and "No benchmark results" not in text
  assert images >= 3, (images, text[-2000:])   # time, speedup, branches vs floor
