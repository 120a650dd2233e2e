# Two commands do all set-up: `make demo` and `make test` (both install first when needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PYTHONDONTWRITEBYTECODE := 1
# dvc.yaml calls the `netvlad` console script: put the venv first on PATH for every recipe.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo test test-fast lint bench report compare docs docs-serve clean-venv dvc-scm

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

# The documentation site (mkdocs.yml, pages under docs/; the reference pages are generated from the code).
# `make docs` builds it into site/ in strict mode (a broken link or anchor fails); `make docs-serve` serves it on
# http://127.0.0.1:8000 and rebuilds on every edit.
docs: install
	$(BIN)/mkdocs build --strict

docs-serve: install
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

# `make report [BASE=<rev>] [MAX_DROP=<points>]`: report.md and report_recall.png, the working tree's params, metrics
# and recall@N curves against BASE (default: the merge base of HEAD with main). MAX_DROP is the gate: exit 1 when a
# model's recall@1 dropped by more than that many points or is no usable number (null, NaN, not a number, gone);
# exit 2 on bad input (an unreadable metrics file, an unknown BASE, MAX_DROP=none or empty: leave MAX_DROP out for
# no gate). BASE and MAX_DROP reach the command as environment variables, never through the shell's parsing or
# make's expansion ($(value ...); not exported as make variables): git allows ' ; $ ( ` in branch names, and the PR
# workflow passes its base branch's name. REPORT_PYTHON=<python> runs it with that interpreter (an environment
# that has this project's dependencies) instead of installing into .venv first.
REPORT_PYTHON ?=
ifneq ($(origin MAX_DROP),undefined)  # before `unexport`, which defines it
report: export NETVLAD_REPORT_MAX_DROP := $(value MAX_DROP)
endif
report: export NETVLAD_REPORT_BASE := $(value BASE)
unexport BASE MAX_DROP NETVLAD_REPORT_MAX_DROP
report: $(if $(REPORT_PYTHON),,install)
	$(or $(REPORT_PYTHON),$(BIN)/python) -m stages.report --out report.md --plot report_recall.png \
	    $${NETVLAD_REPORT_BASE:+--base "$$NETVLAD_REPORT_BASE"} \
	    $${NETVLAD_REPORT_MAX_DROP+--max-drop "$$NETVLAD_REPORT_MAX_DROP"}

# `make compare`: every DVC experiment (workspace, HEAD, `dvc exp run`s) with the params it changed and recall@1/5 of
# each model on the test split and each benchmark, in 120 columns (COMPARE_ARGS: more options of `netvlad compare`).
compare: install
	$(BIN)/netvlad compare $(COMPARE_ARGS)

clean-venv:
	rm -rf $(VENV)
