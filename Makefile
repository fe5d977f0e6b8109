# The quick-start commands: `make serve` and `make test`. Each installs what it needs into .venv
# (`make test` adds the dev extra and Ray, whose Serve scale-out it tests; `make serve` needs neither).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[serve]'
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e '.[serve,dev,ray]'
	touch $@

serve: $(BIN)/.installed
	$(BIN)/vla-foundry serve $(ARGS)

test: $(BIN)/.installed-test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(ARGS)

bench: $(BIN)/.installed
	$(BIN)/python bench/generate.py
