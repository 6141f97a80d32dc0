# The README's two commands. PYTHON may point at a virtual environment's interpreter.
PYTHON ?= python3
NPROC ?= 2

.PHONY: install train test lint

# torch first and pinned: on our CPU machines 2.13.0 is the CPU build; an unpinned torch
# may pull a multi-GB CUDA build. The package itself only asks for torch>=2.9.
install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"

train: install
	$(PYTHON) -m torch.distributed.run --standalone --nproc-per-node=$(NPROC) \
		-m trainer.train --config configs/tiny_cpu.toml

test: install lint
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m ruff check .
