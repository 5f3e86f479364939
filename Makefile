# Quickstart: `make demo` (sample shards -> captions on local Ray) and `make test` (CPU test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv demo test test-gpu lint bench clean

$(BIN)/.installed: pyproject.toml cluster/install.sh
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	sh cluster/install.sh $(BIN)/python test -e
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python jobs/demo.py

# Tests are independent: 2 workers (pytest-xdist), each with its own local Ray and S3 server. More workers
# on a 2-core machine made jobs that start their own Ray time out in Ray's node start-up (GCS overloaded).
test: venv
	$(BIN)/python -m pytest -m "not gpu" -q -n 2

# On a CUDA machine: installs lmdeploy and runs the real-engine tests. install.sh pins the engine stack
# (torch, transformers, lmdeploy, ray) with the gpu extra to cluster/constraints-gpu.txt.
test-gpu: venv
	sh cluster/install.sh $(BIN)/python test,gpu -e
	$(BIN)/python -m pytest -m gpu tests/gpu -v

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: venv
	$(BIN)/python bench/preprocess_bench.py

clean:
	rm -rf $(VENV) out samples
