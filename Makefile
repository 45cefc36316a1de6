# The README's two commands. Each builds .venv when missing, then runs.
#   make app    the Gradio app on http://127.0.0.1:7860 (tiny presets offline; real ones download)
#   make test   ruff (lint + format check) and the test suite, offline, the browser test included

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Any pip arguments for torch, e.g. TORCH_SPEC="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?=
# Where a machine without a CUDA GPU gets torch: the CPU build, not several GB of CUDA packages.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.attnpack-installed

# The browser test drives Debian's chromium; Playwright's own browser download does not work here.
CHROMIUM ?= /usr/bin/chromium

.PHONY: app test lint format install gpu-test gpu-check gpu-wheels clean browser

app: $(STAMP)
	$(BIN)/python -m attnpack.app --host 127.0.0.1 --port 7860

browser:
	@test -x $(CHROMIUM) || { \
		echo "installing Debian's chromium for the browser test"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m "not gpu"

gpu-test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m gpu

# One bounded run for a borrowed CUDA machine (tools/gpu_check.py): install the wheels from .whl/, pytest -m
# gpu, the headline benchmarks, a summary JSON; under 8 minutes. `make gpu-check DEVICE=cpu` rehearses it
# at the smoke sizes. That machine has no .venv, so it runs on python3 there; nothing is built first.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
DEVICE ?= cuda
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py --device $(DEVICE) $(GPU_CHECK_ARGS)

# The wheels gpu-check installs, fetched into .whl/ (needs the network; the GPU machine has none).
gpu-wheels:
	PYTHON=$(PYTHON) sh tools/fetch_gpu_wheels.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH_SPEC)" ]; then \
		echo "installing torch from TORCH_SPEC: $(TORCH_SPEC)"; \
		$(BIN)/python -m pip install $(TORCH_SPEC); \
	elif $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing torch with CUDA"; \
		$(BIN)/python -m pip install torch; \
	else \
		echo "no CUDA GPU found: installing the CPU build of torch from $(TORCH_CPU_INDEX)"; \
		$(BIN)/python -m pip install --retries 1 --timeout 20 --index-url $(TORCH_CPU_INDEX) torch || { \
			echo "$(TORCH_CPU_INDEX) unreachable: installing torch from the default index"; \
			$(BIN)/python -m pip install torch; }; \
	fi
	$(BIN)/python -m pip install -e ".[dev]"
	@touch $@

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
