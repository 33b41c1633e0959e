# Two commands for a newcomer: `make run` and `make test`. Each does its own set-up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JS := tests/js
JS_STAMP := $(JS)/node_modules/.installed

.PHONY: run demo test lint typecheck bench system-deps js-deps clean

$(STAMP): pyproject.toml
	@PYTHON=$(PYTHON) bash scripts/system-deps.sh build
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: set up, then start fleetgate in one process on its embedded defaults (say where to connect)
run: $(STAMP)
	$(BIN)/fleetgate run

## demo: decode the bundled vendor example frames
demo: $(STAMP)
	$(BIN)/fleetgate decode --demo

## test: install what the tests need, then lint, type-check and run the test suite
test: system-deps $(STAMP) js-deps lint typecheck
	$(BIN)/pytest -q

system-deps:
	@PYTHON=$(PYTHON) bash scripts/system-deps.sh test

## js-deps: the Node Pusher clients of the interop tests, exactly as tests/js/package-lock.json pins them
js-deps: $(JS_STAMP)

$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json | system-deps
	cd $(JS) && npm ci --no-audit --no-fund
	touch $(JS_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check codecs fleetgate gateway relay tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

## bench: codec, ingest and fan-out throughput, printed as JSON
bench: $(STAMP)
	$(BIN)/python bench/codecs.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/fanout.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis $(JS)/node_modules
