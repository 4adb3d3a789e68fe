"""Test-wide JAX settings (no silent broadcasting; float64 available for gradient
checks; XLA's backend optimizations off), fixtures shared by test files, and the
run's progress: one line per test file as its last test ends."""
import collections
import os
import time

from tests.scripts import FAST_COMPILE, run_script   # imports no jax

# The tests compile hundreds of small programs (interpret-mode Pallas kernels above all)
# and run each a few times on tiny shapes, so LLVM's optimization passes cost more time
# than they save (measurements: experiments/PERF_NOTES.md, "Test suite"). Set before
# the CPU backend starts; the scripts the tests run inherit it, the notebooks (which train
# models) run without it (`tests.scripts.optimized`); flags already in XLA_FLAGS come
# after, so they win.
os.environ["XLA_FLAGS"] = " ".join([FAST_COMPILE, os.environ.get("XLA_FLAGS", "")]).strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", True)


@pytest.fixture
def cudnn_calls(monkeypatch):
  """Sends jax's cuDNN attention call to its XLA implementation (no cuDNN on a
  CPU), so that the code around the call runs as on a GPU. Returns the list of
  the calls' query shapes, appended as they are traced."""
  calls = []
  dpa = jax.nn.dot_product_attention

  def on_xla(q, *a, implementation, **kw):
    calls.append(q.shape)
    return dpa(q, *a, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", on_xla)
  return calls



# Tests (a file, or one test) that share a module or session fixture, or compiled programs,
# too costly to make once per worker: `--dist loadgroup` sends each group whole to one worker
# (first, the groups being the largest units), every other test alone. The groups are listed
# here, not marked with xdist_group: on pytest 9.2, pytest-xdist 3.8 ignores the mark
# (pytest-dev/pytest-xdist#1386). test_model.py's remat and scan cases reuse the plain
# models' loss and gradients, test_kernel_select.py's cases the reference's compiled block
# scores.
ONE_WORKER = {
    "tests/test_sharding.py": "sharding_check",
    "tests/test_context.py": "context_check",
    "tests/test_experiments_smoke.py::test_bench_kernels_small": "bench_kernels_small",
    "tests/test_notebooks.py::test_performance_plots_a_real_results_file": "bench_kernels_small",
    "tests/test_model.py": "model",
    "tests/test_kernel_select.py": "kernel_select",
}


# Files with tests of 20 s to 2 min (scripts and notebooks in subprocesses, training): handed
# out first, after the groups, so that the run does not end on one worker with one of them.
SLOW_FILES = ("tests/test_experiments_smoke.py", "tests/test_notebooks.py",
              "tests/test_packed.py", "tests/test_readme.py", "tests/test_distill_training.py",
              "tests/test_train.py")


def pytest_collection_modifyitems(items):
  """SLOW_FILES' tests first (in that order), the others after them in collection order."""
  rank = lambda item: (SLOW_FILES.index(item.nodeid.split("::")[0])
                       if item.nodeid.split("::")[0] in SLOW_FILES else len(SLOW_FILES))
  items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """--dist loadgroup, grouped by ONE_WORKER."""
  if config.getvalue("dist") != "loadgroup":
    return None
  from xdist.scheduler import LoadScopeScheduling

  class OneWorkerGroups(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      path, _, name = nodeid.partition("::")
      return ONE_WORKER.get(path) or ONE_WORKER.get(f"{path}::{name.split('[')[0]}") or nodeid

  return OneWorkerGroups(config, log)


@pytest.fixture(scope="session")
def bench_kernels_small(tmp_path_factory):
  """One run of `experiments/bench_kernels.py --small --quick --impl xla` for the tests that
  read what it writes (one worker runs them: ONE_WORKER): (its output directory, its
  stdout)."""
  out = tmp_path_factory.mktemp("bench_kernels_small")
  return out, run_script("bench_kernels", ["--quick", "--impl", "xla"], out)


class FileProgress:
  """Counts each file's tests as they end (in the main process, also under
  pytest-xdist) and prints, after its last one, e.g.
  `[  4:02] tests/test_train.py: 7 passed, 41.3 s`: the time since the session
  started, then the file's outcomes and its tests' summed durations (setup and
  teardown included; its workers' time, not wall time)."""

  def __init__(self, config, terminal):
    self.config, self.terminal = config, terminal
    self.mid_line = False                      # a letter (F, E, s) printed since the last line
    self.start = time.monotonic()
    self.expected = None                       # test file -> number of tests
    self.phases = collections.defaultdict(dict)   # node id -> {when: outcome}
    self.outcomes = collections.defaultdict(collections.Counter)
    self.seconds = collections.defaultdict(float)

  def collected(self, node_ids):
    if self.expected is None:
      self.expected = collections.Counter(n.split("::")[0] for n in node_ids)

  def pytest_collection_finish(self, session):
    if session.items:                          # without xdist (workers collect with it)
      self.collected([item.nodeid for item in session.items])

  @pytest.hookimpl(optionalhook=True)
  def pytest_xdist_node_collection_finished(self, node, ids):
    self.collected(ids)

  @pytest.hookimpl(trylast=True)   # after the terminal reporter printed the report's letter
  def pytest_runtest_logreport(self, report):
    _, letter, _ = self.config.hook.pytest_report_teststatus(report=report, config=self.config)
    self.mid_line |= bool(letter)
    path = report.nodeid.split("::")[0]
    self.seconds[path] += report.duration
    phases = self.phases[report.nodeid]
    phases[report.when] = report.outcome
    if report.when != "teardown" or self.expected is None:
      return
    outcome = ("failed" if phases.get("call") == "failed" else
               "error" if "failed" in phases.values() else
               "skipped" if "skipped" in phases.values() else "passed")
    self.outcomes[path][outcome] += 1
    if sum(self.outcomes[path].values()) == self.expected[path]:
      elapsed = int(time.monotonic() - self.start)
      counts = ", ".join(f"{n} {what}" for what, n in sorted(self.outcomes[path].items()))
      if self.mid_line:
        self.terminal.write("\n")
        self.mid_line = False
      self.terminal.write_line(f"[{elapsed // 60:3d}:{elapsed % 60:02d}] {path}: {counts}, "
                               f"{self.seconds[path]:.1f} s")


@pytest.hookimpl(trylast=True)   # after the terminal reporter is registered
def pytest_configure(config):
  terminal = config.pluginmanager.get_plugin("terminalreporter")
  if terminal is not None and not hasattr(config, "workerinput"):   # not in an xdist worker
    config.pluginmanager.register(FileProgress(config, terminal), "file_progress")


def pytest_report_teststatus(report, config):
  """A passed test prints no dot: the per-file lines are the progress."""
  if report.when == "call" and report.passed:
    return "passed", "", "PASSED"
