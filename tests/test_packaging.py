"""Packaging (no JAX): pyproject's license is an SPDX expression (PEP 639, setuptools >= 77:
the older table form warned on every install), and experiments/ is a package whose scripts
import each other as `experiments.X`, with no sys.path edits anywhere."""
import glob
import os
import re
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_license_is_an_spdx_expression_and_setuptools_reads_it():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)
  assert project["project"]["license"] == "Apache-2.0"
  [setuptools] = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
  assert int(re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools).group(1)) >= 77


def test_experiments_is_a_package_without_path_edits():
  assert os.path.exists(os.path.join(REPO, "experiments", "__init__.py"))
  sources = [p for pattern in ("experiments/*.py", "tests/*.py", "nsa_jax/**/*.py",
                               "pallas_kernels/**/*.py", "notebooks/*.ipynb")
             for p in glob.glob(os.path.join(REPO, pattern), recursive=True)]
  edits = [os.path.relpath(p, REPO) for p in sources
           if re.search(r"sys\.path\.(insert|append)", open(p).read())]
  assert not edits, edits
