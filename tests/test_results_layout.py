"""experiments/results/ holds what lasts (no JAX): each file at its top level is read by
experiments/report.py or a notebook (matched by one of the glob patterns they read, or the
figure beside such a JSON), and each file under results/history/ has its line in
history/INDEX.md saying what it was."""
import fnmatch
import glob
import json
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "experiments", "results")
HISTORY = os.path.join(RESULTS, "history")
PATTERN = re.compile(r"""["']([\w-]*\*[\w.*-]*\.json)["']""")


def read_patterns() -> set[str]:
  """The glob patterns of results JSON that report.py and the notebooks' code read."""
  sources = [open(os.path.join(REPO, "experiments", "report.py")).read()]
  for path in glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")):
    sources += ["".join(cell["source"]) for cell in json.load(open(path))["cells"]
                if cell["cell_type"] == "code"]
  return {p for source in sources for p in PATTERN.findall(source)}


def test_results_top_level_holds_only_what_a_reader_reads():
  patterns = read_patterns()
  assert "bench_kernels_*.json" in patterns and "retrieval_*.json" in patterns, patterns
  files = [f for f in os.listdir(RESULTS) if os.path.isfile(os.path.join(RESULTS, f))]
  read = {f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)}
  stems = {os.path.splitext(f)[0] for f in read}
  # A JSON's figures: <stem>.png, and <stem>_example.png for retrieval's needle example.
  figures = {f for f in files if f.endswith(".png")
             and re.sub(r"(_example)?\.png$", "", f) in stems}
  unread = sorted(set(files) - read - figures)
  assert not unread, (f"{unread}: no reader (report.py, notebooks) matches; git mv them to "
                      "experiments/results/history/ and add their lines to its INDEX.md")


def test_history_index_has_one_line_per_file():
  index = open(os.path.join(HISTORY, "INDEX.md")).read()
  listed = re.findall(r"^\| ([\w./-]+\.\w+) \|", index, flags=re.M)   # the table's first column
  files = sorted(os.path.relpath(os.path.join(d, f), HISTORY)
                 for d, _, names in os.walk(HISTORY) for f in names if f != "INDEX.md")
  assert sorted(set(listed)) == files
  assert len(listed) == len(set(listed)), "a file listed twice"
