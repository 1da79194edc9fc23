# Two commands do all set-up on a fresh machine with Python 3.11: `make test` and `make repro`.
PYTHON ?= python3
# the oldest Python the pinned numpy/scipy/snakemake run on (pyproject.toml requires-python)
PYTHON_MIN := 3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every install is pinned: pip and setuptools too (constraints.txt), and codetr is built by the
# venv's pinned setuptools, not by the newest one pip would fetch into an isolated build env.
PIP_INSTALL := $(BIN)/python -m pip install -c constraints.txt

export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1

.PHONY: setup test repro bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@py=$(BIN)/python; test -x $$py || py=$(PYTHON); \
	$$py -c 'import sys; sys.exit(sys.version_info[:2] < tuple(map(int, "$(PYTHON_MIN)".split("."))))' \
	  2>/dev/null || { echo "make setup: $$py is Python $$($$py -c 'import sys; print("%d.%d" % \
	  sys.version_info[:2])' 2>/dev/null || echo '(not found)'); codetr needs Python >= $(PYTHON_MIN)" \
	  "(pyproject.toml requires-python). Use a newer one: make setup PYTHON=python3.11" \
	  "(after make clean if .venv was made with the old one)" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --quiet --upgrade pip setuptools
	$(PIP_INSTALL) --no-build-isolation -e '.[pipeline,pretrained,test,export]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

bench: setup
	$(PIP_INSTALL) --no-build-isolation -e '.[bench]'
	$(BIN)/python bench/msda.py
	$(BIN)/python bench/learning.py

clean:
	rm -rf $(VENV) .pytest_cache
