# make test: create .venv if missing, install everything the suite needs, run it (without the slow tier).
# make test-slow: the slow tier only (parallel deployments on real vLLM, ~5 min on 2 cores).
# make demo: run the main job.
# make gpu-check OUT=DIR: on a CUDA machine, install the CUDA stack into .venv-gpu and write
#   the GPU report to DIR (default gpu-report); without a CUDA device it says so and exits 0.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ucxkv-installed
PIP := $(BIN)/pip --disable-pip-version-check -q

.PHONY: test test-slow demo install clean gpu-check

OUT ?= gpu-report

install: $(STAMP)

$(STAMP): pyproject.toml requirements-test.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip 2>/dev/null
	$(PIP) install -r requirements-test.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PIP) install -e '.[test,bench,proxy]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers beside CPU torch.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
	$(BIN)/python -c "import torch, ucxx, zmq, msgspec, vllm, transport" 
	$(BIN)/python -c "from transport import _ucp_rma, _ucp_tag; _ucp_rma.lib(); assert _ucp_tag.lib()"  # build the C helpers now
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m slow

demo: $(STAMP)
	$(BIN)/python -m bench.demo

gpu-check:
	bash scripts/gpu_check.sh $(OUT)

clean:
	rm -rf $(VENV) .venv-gpu .gpu-cache .pytest_cache
