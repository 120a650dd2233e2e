# Two commands do all set-up: `make demo` and `make test` (both install first when needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PYTHONDONTWRITEBYTECODE := 1
# dvc.yaml calls the `netvlad` console script: put the venv first on PATH for every recipe.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo test test-fast lint bench clean-venv dvc-scm

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,onnx]'
	@touch $(STAMP)

# DVC needs git or core.no_scm; in a plain folder fall back to no_scm (written to the untracked config.local).
dvc-scm:
	@git rev-parse --is-inside-work-tree >/dev/null 2>&1 || $(BIN)/dvc config --local core.no_scm true

demo: install dvc-scm
	$(BIN)/dvc repro

# `make test` is what CI runs: the linter, then every test; `make test-fast` skips the slow end-to-end tests.
test: install lint
	$(BIN)/python -m pytest

test-fast: install lint
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check netvlad_core stages tests bench

bench: install
	$(BIN)/python -m bench

clean-venv:
	rm -rf $(VENV)
