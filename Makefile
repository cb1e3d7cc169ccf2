PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test check migrate bench test-deps

# uv (from PyPI) installs the project in seconds where pip takes most of a minute.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv

# `make run` installs only what the gateway needs; the test and check tools come with `make test`.
$(VENV)/.run: pyproject.toml | $(PY)
	$(VENV)/bin/uv pip install -q --python $(PY) -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(PY)
	$(VENV)/bin/uv pip install -q --python $(PY) -e '.[dev]'
	touch $(VENV)/.run $@

run: $(VENV)/.run
	$(VENV)/bin/gateway serve

# The browser test drives Debian's Chromium, the load-balancer test Debian's nginx; the AI SDK test runs
# the pinned `ai` npm package.
test-deps:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || (apt-get update -qq && apt-get install -y -qq nginx)
	@test -d tests/js/node_modules/ai || (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)

test: $(VENV)/.dev test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

check: $(VENV)/.dev
	$(VENV)/bin/ruff check gateway providers storage tests bench
	$(VENV)/bin/mypy

migrate: $(VENV)/.run
	$(VENV)/bin/gateway migrate

# Results go to .streamgate/bench/<date>.json (git-ignored); BENCH_ARGS=--save writes bench/results/<date>.json.
bench: $(VENV)/.run
	$(VENV)/bin/gateway bench $(BENCH_ARGS)
