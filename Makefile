# The two README commands. Both create .venv and install the project first.
# `make test` runs the whole suite on two stacks at once (one per core):
# the machine's python3 with the jax it gets, and the newest Python pyenv has
# with the newest jax and flax (NEWEST_PYTHON= skips that one).
PYTHON ?= python3
NEWEST_PYTHON ?= $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.1[2-9].*/bin/python3)))
VENV ?= .venv
NEWEST_VENV ?= .venv-newest
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NEWEST_STAMP := $(NEWEST_VENV)/.installed
PYTEST := -m pytest -q -rfEs -p no:cacheprovider

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# --upgrade-strategy eager: the newest release of everything, not what an
# older install left behind.
$(NEWEST_STAMP): pyproject.toml
	$(NEWEST_PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[test]'
	touch $(NEWEST_STAMP)

demo: $(STAMP)
	$(BIN)/ckpt-surgery demo --workdir demo

ifeq ($(NEWEST_PYTHON),)
test: $(STAMP)
	@echo 'no newer Python under pyenv: the suite runs on $(PYTHON) only'
	$(BIN)/python $(PYTEST)
else
test: $(STAMP) $(NEWEST_STAMP)
	@$(BIN)/python -c 'import sys, jax; print(f"stack 1: Python {sys.version.split()[0]}, jax {jax.__version__}")'
	@$(NEWEST_VENV)/bin/python -c 'import sys, jax; print(f"stack 2: Python {sys.version.split()[0]}, jax {jax.__version__}")'
	@bash tests/both_stacks.sh $(BIN)/python $(NEWEST_VENV)/bin/python $(PYTEST)
endif

clean:
	rm -rf $(VENV) $(NEWEST_VENV) demo
