# The quick-start commands: `make serve` and `make test`. Each installs what it needs into .venv
# (`make test` adds the dev extra and Ray, whose Serve scale-out it tests; `make serve` needs neither).
# `make test` also builds .venv-openpi: the real openpi-client (it pins numpy < 2), which a test drives
# against a live server.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test bench soak openpi-venv gpu-check chromium redis-server

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[serve]'
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e '.[serve,dev,ray]'
	touch $@

# Rebuilt when its pins change; exits 0 without it when the registry is unreachable (the test then skips).
openpi-venv: $(BIN)/.installed
	$(BIN)/python tests/openpi/make_venv.py

serve: $(BIN)/.installed
	$(BIN)/vla-foundry serve $(ARGS)

# The browser test's Chromium, from Debian where this user may install it; without it that test skips.
chromium:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium could not be installed here: the browser test will skip"

# Redis for the sessions shared across replicas (VLA_SESSION_STORE), from Debian likewise; without it those tests skip.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null 2>&1; }; }; } || \
	  echo "redis-server could not be installed here: the shared-session tests will skip"

test: $(BIN)/.installed-test openpi-venv chromium redis-server
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(ARGS)

bench: $(BIN)/.installed
	$(BIN)/python bench/generate.py

# Not in CI: the demo pack served for 5 minutes under mixed traffic; fails on RSS growth >= 5 % after warm-up or
# any error (bench/soak.py; ARGS="--duration 60" for a shorter one). The serve extra has all it needs.
soak: $(BIN)/.installed
	$(BIN)/python bench/soak.py $(ARGS)

# On a GPU host: the GPU tests and the GPU rows of every bench, one summary table (bench/gpu_check.py).
gpu-check: $(BIN)/.installed-test
	HF_HUB_OFFLINE=1 $(BIN)/python bench/gpu_check.py $(ARGS)
