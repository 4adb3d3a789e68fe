# The two commands of the README: `make train` (main job) and `make test`; then
# `make notebooks`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NOTEBOOKS_STAMP := $(VENV)/.notebooks

.PHONY: setup train test notebooks clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/find_python.sh
	@python=$$(scripts/find_python.sh) || exit 1; \
	  echo "using $$python"; \
	  [ -x $(PY) ] || $$python -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# Trains the `demo` preset (a small NSA language model on the Python standard
# library's source) on the CPU, saves a checkpoint, prints a sample.
train: setup
	$(PY) -m experiments.train --preset demo

# Tests run in parallel (pytest-xdist), handed out one at a time so that no slow
# file holds up the end (the slowest files first: tests/conftest.py's SLOW_FILES),
# except the groups of tests/conftest.py's ONE_WORKER (the 8-device checks, files whose
# tests share compiled programs), each whole to one worker so that its setup runs once
# (--dist loadgroup). A line per
# test file as it finishes, the slowest tests last.
test: setup
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadgroup --durations=10

# The `[notebooks]` extra (Jupyter Lab, nbclient) into .venv, then Jupyter Lab on
# notebooks/ (they run on the CPU; committed without outputs).
notebooks: $(NOTEBOOKS_STAMP)
	$(VENV)/bin/jupyter lab notebooks/

$(NOTEBOOKS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[notebooks]"
	touch $(NOTEBOOKS_STAMP)

clean:
	rm -rf $(VENV) runs
