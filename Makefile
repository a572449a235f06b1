# handgrad: the two front-door commands are `make demo` and `make test`; both install first.
#
#   make install     create .venv (unless a virtualenv is active), install torch and the tools,
#                    build the extension (idempotent: does nothing when nothing changed)
#   make demo        train the figure 7.8 network with torch.nn and with handgrad (problem 7.16)
#   make test        the test suite
#   make bench       the CPU benchmark table (benchmarks/RESULTS.md explains it)
#   make sanitize    build with AddressSanitizer + UBSan into build/sanitize, run the tests there
#   make cuda-build  compile and link the CUDA build on a machine with nvcc (no GPU needed)

TORCH_SPEC ?= torch==2.13.0
PACKAGES    = numpy pytest hypothesis pybind11 ninja matplotlib "setuptools>=64" wheel

ifdef VIRTUAL_ENV
  PYTHON := $(VIRTUAL_ENV)/bin/python
else
  PYTHON := $(CURDIR)/.venv/bin/python
endif
PIP     := $(PYTHON) -m pip
STAMP   := $(dir $(PYTHON)).handgrad-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/*)

.PHONY: install demo test bench sanitize clean

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

# The sanitized library is built beside the normal one, and the tests import it from there.
# Python itself is not instrumented, so the runtimes are preloaded; leak checking is off
# because the interpreter keeps objects alive at exit by design.
SANITIZE_DIR := build/sanitize
sanitize: install
	rm -rf $(SANITIZE_DIR) && mkdir -p $(SANITIZE_DIR)
	cp -r pyext/handgrad $(SANITIZE_DIR)/ && rm -f $(SANITIZE_DIR)/handgrad/_C*.so
	HANDGRAD_SANITIZE=1 $(PYTHON) setup.py -q build_ext --force --build-lib $(SANITIZE_DIR) --build-temp $(SANITIZE_DIR)/temp
	cp pyext/handgrad/_build_config.py $(SANITIZE_DIR)/handgrad/
	PYTHONPATH=$(CURDIR)/$(SANITIZE_DIR) \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	$(PYTHON) -c "import handgrad, sys; assert '$(SANITIZE_DIR)' in handgrad._C.__file__, handgrad._C.__file__; print('sanitized build:', handgrad._C.__file__)" && \
	PYTHONPATH=$(CURDIR)/$(SANITIZE_DIR) \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	$(PYTHON) -m pytest -q -p no:cacheprovider tests $(SANITIZE_PYTEST_ARGS)

clean:
	rm -rf build pyext/*.egg-info pyext/handgrad/_C*.so pyext/handgrad/_build_config.py $(STAMP)
