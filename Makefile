# `make lab` and `make test` both create or reuse .venv and are safe to run twice.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: lab test test-fast lint venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned, then the package with the constraints file so nothing
# else can replace torch with a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,lab]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

lab: venv
	$(BIN)/graddoctor lab --preset default --out runs/lab

test: venv lint
	$(BIN)/python -m pytest -q

# the loop while you work: every test but those marked slow (browser, lab, distributed, subprocesses)
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

# ruff (pycodestyle, pyflakes, import order; lines up to 120) and mypy, configured in pyproject.toml
lint: venv
	$(BIN)/ruff check graddoctor
	$(BIN)/mypy graddoctor

clean:
	rm -rf $(VENV) runs .pytest_cache
