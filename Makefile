# The two set-up commands of the README are `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= ./smtpgw-data
RUN_ARGS ?=
# `make run` keeps what it would send in the data directory; RELAY=mx delivers
# to the recipients' MX hosts, RELAY=smtp://host:port to a smarthost.
RELAY ?= capture

.PHONY: run test lint types pytest bench clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python setup.py pyproject.toml
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/twistd -n --pidfile= --logger=smtpgw.logs.observer smtpgw --data-dir $(DATA_DIR) --relay $(RELAY) $(RUN_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check smtpgw web twisted/plugins tests bench
	$(BIN)/ruff format --check smtpgw web twisted/plugins tests bench

types: $(STAMP)
	$(BIN)/mypy

# Two workers, whole files each: the end-to-end files mostly wait (on
# --rate, on a browser), and another file runs meanwhile.
pytest: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -q -n 2 --dist loadfile

test: lint types pytest

bench: $(STAMP)
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.delivery_bench
	$(BIN)/python -m bench.queue_bench
	$(BIN)/python -m bench.campaign_bench

clean:
	rm -rf $(VENV) build *.egg-info dropin.cache
