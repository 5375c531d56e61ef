# Newcomer entry points: `make train` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON3 ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check --progress-bar off -q
STAMP   := $(VENV)/.installed
# torch is pinned first: 2.13.0 is the CPU wheel already on disk here; leaving torch to the
# dependency resolver would download several GB of CUDA wheels.
TORCH_PIN ?= torch==2.13.0
# pip prints one "Location ... is ignored" warning per package for absent local index folders.
PIP_FILTER := grep -v -E "^WARNING: Location '.*' is ignored" || true

# The default job: the toy model on the embedded corpus, composed parallelism on 4 gloo
# processes: 2 pipeline stages (DualPipe) x 2 data-parallel replicas, experts split over the
# replicas (expert parallel 2), ZeRO-1; progress bar on rank 0, metrics in runs/demo; held-out
# loss of the weights and of their CPU EMA every 50 steps.
# Hydra overrides go in TRAIN_ARGS, e.g. make train TRAIN_ARGS="train.steps=20".
NPROC      ?= 4
TRAIN_CMD  ?= $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m launch.train parallel=demo run.dir=runs/demo \
             train.eval_every=50 train.ema_decay=0.99
TRAIN_ARGS ?=
PYTEST_ARGS ?=

export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help install train test bench

help:
	@echo "make train   create .venv if needed, install, run the default training job"
	@echo "make test    create .venv if needed, install, run the test suite (PYTEST_ARGS=...)"
	@echo "make bench   run every benchmarks/*.py"

$(PY):
	$(PYTHON3) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	{ $(PIP_INSTALL) '$(TORCH_PIN)' 2>&1; } | { $(PIP_FILTER); }
	{ $(PIP_INSTALL) -e '.[test]' 2>&1; } | { $(PIP_FILTER); }
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(TRAIN_CMD) $(TRAIN_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -x --timeout=600 $(PYTEST_ARGS)

bench: $(STAMP)
	@shopt -s nullglob; files=(benchmarks/*.py); \
	if [ $${#files[@]} -eq 0 ]; then echo "no benchmarks/*.py yet"; exit 0; fi; \
	for f in "$${files[@]}"; do echo "== $$f"; $(PY) "$$f"; done
