# Quick start:  make demo   (set up + train recipes/tiny_blocks.yaml on CPU)
#               make test   (set up + run the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# Test workers (pytest-xdist), one test file each at a time: two halve the suite's wall time on CI's 2 cores.
TEST_WORKERS ?= 2

.PHONY: setup demo test test-all bench clean

setup: $(VENV)/.installed

# torch first (pinned: 2.13.0 is the local CPU wheel; anything else pulls CUDA),
# deepspeed without build isolation (it imports torch in setup.py), then the package.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed==0.19.8"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/r3-rl train recipes/tiny_blocks.yaml

test: setup
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

test-all: setup
	$(VENV)/bin/pytest -q -m ''

clean:
	rm -rf $(VENV) runs .cache
