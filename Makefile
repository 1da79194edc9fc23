# Two commands do all set-up on a fresh machine with Python 3.11: `make test` and `make repro`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1

.PHONY: setup test repro bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[pipeline,pretrained,test,export]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

bench: setup
	$(BIN)/python -m pip install -c constraints.txt -e '.[bench]'
	$(BIN)/python bench/msda.py
	$(BIN)/python bench/learning.py

clean:
	rm -rf $(VENV) .pytest_cache
