"""The repository documents itself: short module docstrings that link docs/, every docs/ link
resolves to a file and heading, and no reference to design documents outside the repository.
Reads files only (no JAX)."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MAX_MODULE_DOCSTRING_LINES = 15
# Not the repository's text: results, runs, caches, and hidden folders other than .ci (git's,
# the venv's, a developer's ignored scratch copies).
SKIP_DIRS = {"results", "runs", "__pycache__", "nsa_jax.egg-info"}
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".toml", ".txt", ".cfg", ".sh"}
# Design documents that once lived outside the repository (spelled in pieces, so that this
# file does not match itself).
OUTSIDE = re.compile(r"\bSP" + r"EC\b|KERN" + r"ELS\.md")
DOCS_LINK = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
RELATIVE_LINK = re.compile(r"\]\(([\w.-]+\.md)?(?:#([\w-]+))?\)")


def repository_files():
  def walk(folder):
    for path in sorted(folder.iterdir()):
      if path.is_dir():
        if path.name not in SKIP_DIRS and (path.name == ".ci" or not path.name.startswith(".")):
          yield from walk(path)
      elif path.suffix in TEXT_SUFFIXES or path.name == "Makefile":
        yield path
  return list(walk(ROOT))


def anchor(heading: str) -> str:
  """The anchor GitHub gives a markdown heading."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def anchors(doc: pathlib.Path) -> set[str]:
  return {anchor(line.lstrip("#")) for line in doc.read_text().splitlines()
          if line.startswith("#")}


def test_module_docstrings_are_short():
  """A module says what it is in a few lines and links docs/ for the design."""
  long = {}
  for folder in ("nsa_jax", "pallas_kernels", "experiments", "tests", "scripts"):
    for path in sorted((ROOT / folder).rglob("*.py")):
      doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
      if len(doc.splitlines()) > MAX_MODULE_DOCSTRING_LINES:
        long[str(path.relative_to(ROOT))] = len(doc.splitlines())
  assert not long, f"module docstrings over {MAX_MODULE_DOCSTRING_LINES} lines: {long}"


def test_no_reference_to_documents_outside_the_repository():
  found = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
           for path in repository_files()
           for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
           if OUTSIDE.search(line)]
  assert not found, "references to design documents outside the repository:\n" + "\n".join(
      found[:20])


def test_docs_links_resolve():
  """Every `docs/<file>.md#<section>` in the repository, and every relative link inside
  docs/, names an existing file and one of its headings (a link without a section may name
  a file another branch adds)."""
  broken = []

  def check(where, target: pathlib.Path, section):
    if section is None:
      return
    if not target.exists():
      broken.append(f"{where}: {target.name} does not exist")
    elif section not in anchors(target):
      broken.append(f"{where}: no heading #{section} in {target.name}")

  for path in repository_files():
    text = path.read_text(errors="replace")
    where = path.relative_to(ROOT)
    for name, section in DOCS_LINK.findall(text):
      check(where, DOCS / name, section or None)
    if path.parent == DOCS:
      for name, section in RELATIVE_LINK.findall(text):
        check(where, DOCS / name if name else path, section or None)
  assert not broken, "\n".join(broken)
