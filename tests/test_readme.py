"""The README's results section is generated from the committed JSON, never typed by hand."""
from experiments import report


def test_readme_results_are_generated_from_committed_results():
  text = report.render()
  assert "bench_kernels" in text and "| A | 64k | 16 |" in text
  readme = (report.ROOT / "README.md").read_text()
  assert text in readme, "README.md results are stale: run python experiments/report.py"
