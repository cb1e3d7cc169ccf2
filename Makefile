PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test check migrate bench test-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/gateway serve

# The browser test drives Debian's Chromium; the AI SDK test runs the pinned `ai` npm package.
test-deps:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	@test -d tests/js/node_modules/ai || (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)

test: $(STAMP) test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

check: $(STAMP)
	$(VENV)/bin/ruff check gateway providers storage tests
	$(VENV)/bin/mypy

migrate: $(STAMP)
	$(VENV)/bin/gateway migrate

bench: $(STAMP)
	$(VENV)/bin/gateway bench $(BENCH_ARGS)
