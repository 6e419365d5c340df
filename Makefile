# theria: `make demo` and `make test` do everything on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.theria-installed
# torch/torchvision pinned for the install path `make` uses (served from local disk here);
# the package metadata in pyproject.toml keeps lower bounds only.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-slow test-all demo lint bench-cpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,hf]' $(TORCH_PIN)
	touch $(STAMP)

# Default tier: fast tests (pytest exits non-zero, 5, if it collected nothing). On a machine
# with a CUDA device the Triton interpreter tests need a process of their own (tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q
	$(PY) -m tests.interpret -m "not slow" -q

# Heavier tests (interpreter kernels at larger sizes, experiment presets, multi-process runs).
test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" -q
	$(PY) -m tests.interpret -m "slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m theria.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check theria tests experiments

bench-cpu: $(STAMP)
	$(PY) -m theria.bench cpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
