# Two commands do all the set-up on a fresh machine: `make up` starts the platform, `make test` runs
# the tests. Both create the virtual environment in .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: up test lint venv bench clean

$(BIN)/citadel: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lstm]'
	@touch $@

venv: $(BIN)/citadel

up: venv
	$(BIN)/citadel up

lint: venv
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/ruff format --check src tests $(wildcard bench)
	$(BIN)/mypy --strict src/citadel

test: lint
	$(BIN)/pytest -q

bench: venv
	$(BIN)/python bench/gateway_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
