# Each target sets up .venv on its own, so on a fresh machine `make demo` or
# `make test` is the whole installation.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

# torch and torchvision go first: the pinned builds lie on this machine's disk,
# and avalanche-lib needs a torchvision that imports beside torch.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cl-plugin demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --doctest-modules cl_plugin tests

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'

clean:
	rm -rf $(VENV) build *.egg-info
