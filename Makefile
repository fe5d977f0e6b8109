# The two quick-start commands: `make serve` and `make test`. Each installs what it needs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[serve,dev,ray]'
	touch $@

serve: $(BIN)/.installed
	$(BIN)/vla-foundry serve $(ARGS)

test: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(ARGS)

bench: $(BIN)/.installed
	$(BIN)/python bench/generate.py
