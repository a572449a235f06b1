# handgrad: the two front-door commands are `make demo` and `make test`; both install first.
#
#   make install     create .venv (unless a virtualenv is active), install torch and the tools,
#                    build the extension (idempotent: does nothing when nothing changed)
#   make demo        train the figure 7.8 network with torch.nn and with handgrad (problem 7.16)
#   make test        the test suite
#   make bench       the CPU benchmark table (benchmarks/RESULTS.md explains it)
#   make cuda-build  compile and link the CUDA build on a machine with nvcc (no GPU needed)

TORCH_SPEC ?= torch==2.13.0
PACKAGES    = numpy pytest pybind11 ninja matplotlib "setuptools>=64" wheel

ifdef VIRTUAL_ENV
  PYTHON := $(VIRTUAL_ENV)/bin/python
else
  PYTHON := $(CURDIR)/.venv/bin/python
endif
PIP     := $(PYTHON) -m pip
STAMP   := $(dir $(PYTHON)).handgrad-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/*)

.PHONY: install demo test bench clean

install: $(STAMP)

$(PYTHON):
	python3 -m venv $(CURDIR)/.venv

# Build isolation stays off: it would download a multi-GB CUDA build of torch to compile
# against, instead of using the torch installed here.
$(STAMP): $(PYTHON) $(SOURCES) Makefile
	$(PIP) install -q $(TORCH_SPEC) $(PACKAGES)
	$(PIP) install -q --no-build-isolation -e .
	@touch $@

demo: install
	$(PYTHON) -m handgrad.examples.fig7_8 --out figures

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) benchmarks/bench_layers.py

clean:
	rm -rf build pyext/*.egg-info pyext/handgrad/_C*.so pyext/handgrad/_build_config.py $(STAMP)
