# handgrad: the two front-door commands are `make demo` and `make test`; both install first.
#
#   make install     create .venv (unless a virtualenv is active), install torch where none is,
#                    and the tools, build the extension (does nothing when nothing changed)
#   make demo        train the figure 7.8 network with torch.nn and with handgrad (problem 7.16)
#   make test        the test suite
#   make test-capabilities  the CPU parity tests again with each lower CPU capability this CPU
#                    offers (torch's kernels lowered with handgrad's: ATEN_CPU_CAPABILITY)
#   make bench       the CPU benchmark tables: layers and whole networks (benchmarks/RESULTS.md),
#                    for each CPU capability this CPU offers
#   make sanitize    build with AddressSanitizer + UBSan into build/sanitize, run the tests there
#   make cuda-build  compile and link the CUDA build on a machine with nvcc (no GPU needed)
#   make no-openmp-build  build without OpenMP (as on macOS) and run the suite on it
#   make check-aarch64  cross-compile for Linux aarch64 and run part of the suite under
#                    qemu-aarch64-static (benchmarks/check_aarch64.sh sets it all up)

# torch is installed only where none is: an active virtual environment keeps its own.
#   TORCH_SPEC   what to install where torch is missing
#   TORCH_INDEX  a package index for it, e.g. https://download.pytorch.org/whl/cpu for the
#                CPU-only wheels (PyPI's torch for Linux is a CUDA build, over 1.5 GB)
#   FORCE_TORCH  1: install TORCH_SPEC even over a torch that is already there
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
FORCE_TORCH ?= 0
PACKAGES     = numpy pytest hypothesis expecttest pybind11 ninja matplotlib "setuptools>=64" wheel

ifdef VIRTUAL_ENV
  PYTHON := $(VIRTUAL_ENV)/bin/python
else
  PYTHON := $(CURDIR)/.venv/bin/python
endif
PIP     := $(PYTHON) -m pip
STAMP   := $(dir $(PYTHON)).handgrad-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/autograd/* csrc/cpu/* csrc/cpu/kernels/* csrc/cuda/*)

.PHONY: install demo test test-capabilities bench sanitize cuda-build no-openmp-build check-aarch64 aarch64-build clean

install: $(STAMP)

$(PYTHON):
	python3 -m venv $(CURDIR)/.venv

# Build isolation stays off: it would download a multi-GB CUDA build of torch to compile
# against, instead of using the torch installed here.
$(STAMP): $(PYTHON) $(SOURCES) Makefile
	@if [ "$(FORCE_TORCH)" != 1 ] && $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "handgrad: using the torch already in $(dir $(PYTHON)): $$($(PYTHON) -c 'import torch; print(torch.__version__)') (FORCE_TORCH=1 installs $(TORCH_SPEC) instead)"; \
	else \
	  echo "handgrad: installing $(TORCH_SPEC)$(if $(TORCH_INDEX), from $(TORCH_INDEX))"; \
	  $(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"; \
	fi
	$(PIP) install -q $(PACKAGES)
	$(PIP) install -q --no-build-isolation -e .
	@touch $@

demo: install
	$(PYTHON) -m handgrad.examples.fig7_8 --out figures

test: install
	$(PYTHON) -m pytest -q tests

# A lower capability: torch's kernels (ATEN_CPU_CAPABILITY, which handgrad follows), oneDNN's
# JIT and MKL are all held to it, as on a CPU that has no more. (torch.compile is timed on the
# CPU's own capability only: Inductor's kernels fail under a lowered ATEN_CPU_CAPABILITY.)
LOWER_CPUS = $$($(PYTHON) -c "from handgrad import _capability as c; print(' '.join(c.runnable()[:-1]))")
define as_capability
ATEN_CPU_CAPABILITY=$$(echo $(1) | tr A-Z a-z) ONEDNN_MAX_CPU_ISA=$$([ $(1) = DEFAULT ] && echo SSE41 || echo $(1) | sed 's/AVX512/AVX512_CORE/') \
	MKL_ENABLE_INSTRUCTIONS=$$([ $(1) = DEFAULT ] && echo SSE4_2 || echo $(1))
endef
CAPABILITY_TESTS = tests/test_ops.py tests/test_fused_mlp.py tests/test_mlp.py tests/test_gradcheck.py
# What a build that differs from `make install`'s only in how it compiles the kernels can get
# wrong: the parity and gradcheck tests, the double backward, what build_info() says. The whole
# suite runs once, in `make test`; CI must finish within 90 minutes on two cores.
KERNEL_TESTS = $(CAPABILITY_TESTS) tests/test_second_order.py tests/test_errors.py tests/test_cpu_dispatch.py \
	--deselect tests/test_cpu_dispatch.py::test_one_build_runs_on_an_emulated_older_cpu

test-capabilities: install
	@for c in $(LOWER_CPUS); do echo "== the CPU parity tests with the $$c kernels"; \
	  $(call as_capability,$$c) $(PYTHON) -m pytest -q -p no:cacheprovider $(CAPABILITY_TESTS) || exit 1; done

bench: install
	@own=$$($(PYTHON) -c 'import handgrad; print(handgrad.build_info()["cpu_capability"])'); \
	for c in $$($(PYTHON) -c "from handgrad import _capability as c; print(' '.join(reversed(c.runnable())))"); do \
	  echo "== CPU capability $$c"; compile=$$([ $$c = $$own ] && echo yes || echo no); \
	  $(call as_capability,$$c) $(PYTHON) benchmarks/bench_layers.py --out benchmarks/out/$$c --compile $$compile || exit 1; \
	  $(call as_capability,$$c) $(PYTHON) benchmarks/bench_networks.py --out benchmarks/out/$$c --compile $$compile || exit 1; done

# $(call build_into,DIR,PYTHON,ENVIRONMENT): the package, with its library freshly built by
# PYTHON under ENVIRONMENT, in DIR, beside the editable install, for tests to import from there.
# setup.py writes _build_config.py into the checkout; the checkout's own is put back after.
define build_into
	rm -rf $(1) && mkdir -p $(1)
	cp -r pyext/handgrad $(1)/ && rm -f $(1)/handgrad/*.so
	if [ -f pyext/handgrad/_build_config.py ]; then cp pyext/handgrad/_build_config.py $(1)/checkout_config.py; fi
	$(3) $(2) setup.py -q build_ext --force --build-lib $(1) --build-temp $(1)/temp
	cp pyext/handgrad/_build_config.py $(1)/handgrad/
	if [ -f $(1)/checkout_config.py ]; then mv $(1)/checkout_config.py pyext/handgrad/_build_config.py; fi
endef

# Python itself is not instrumented, so the sanitizer runtimes are preloaded; leak checking
# is off because the interpreter keeps objects alive at exit by design.
SANITIZE_DIR := build/sanitize
SANITIZE_ENV := PYTHONPATH=$(CURDIR)/$(SANITIZE_DIR) \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
sanitize: install
	$(call build_into,$(SANITIZE_DIR),$(PYTHON),HANDGRAD_SANITIZE=1)
	$(SANITIZE_ENV) $(PYTHON) -c "import handgrad; print('sanitized build:', handgrad._C.__file__)" \
		| grep -F "$(SANITIZE_DIR)"
	$(SANITIZE_ENV) $(PYTHON) -m pytest -q -p no:cacheprovider tests

# The CUDA build needs no GPU to compile and link: a cached virtual environment outside the
# checkout holds the CUDA build of torch; setup.py finds the toolkit root and cuBLAS headers.
CUDA_VENV       ?= $(HOME)/.cache/handgrad-cuda-venv
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_DIR        := build/cuda
# Besides the kernels' tests, those of what a newer torch may change: compile, export, DDP,
# torch.func. (All capabilities are built: the tests compare bits with torch's own kernels,
# which run this CPU's capability, and Inductor's fail under a lowered one.)
CUDA_BUILD_TESTS = $(KERNEL_TESTS) tests/test_cuda.py tests/test_compile.py tests/test_ecosystem.py tests/test_func.py
cuda-build:
	test -x $(CUDA_VENV)/bin/python || python3 -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q $(CUDA_TORCH_SPEC) $(PACKAGES)
	$(call build_into,$(CUDA_DIR),$(CUDA_VENV)/bin/python,HANDGRAD_CUDA=1)
	PYTHONPATH=$(CURDIR)/$(CUDA_DIR) $(CUDA_VENV)/bin/python -c \
		"import handgrad; assert handgrad.cuda_built(), 'no CUDA kernels'; print('CUDA build:', handgrad._C.__file__)"
	PYTHONPATH=$(CURDIR)/$(CUDA_DIR) $(CUDA_VENV)/bin/python -m pytest -q -p no:cacheprovider $(CUDA_BUILD_TESTS)

# Without OpenMP, as Apple's clang builds it: the CPU kernels on one thread; the kernels'
# tests must pass all the same. It builds DEFAULT alone, and holds torch to DEFAULT too, as
# make test-capabilities does: the tests compare bits with torch's kernels.
NO_OPENMP_DIR := build/no-openmp
no-openmp-build: install
	$(call build_into,$(NO_OPENMP_DIR),$(PYTHON),HANDGRAD_OPENMP=0 HANDGRAD_BUILD_CAPABILITIES=DEFAULT)
	PYTHONPATH=$(CURDIR)/$(NO_OPENMP_DIR) $(PYTHON) -c \
		"import handgrad; i = handgrad.build_info(); assert not i['openmp'], i; print('no-OpenMP build:', handgrad._C.__file__, i['cpu_kernel_threads'])"
	PYTHONPATH=$(CURDIR)/$(NO_OPENMP_DIR) $(call as_capability,DEFAULT) $(PYTHON) -m pytest -q -p no:cacheprovider $(KERNEL_TESTS)

# Linux aarch64 on this x86-64 machine: the script installs the cross compiler, qemu, an
# arm64 Python and torch's aarch64 wheel, then has that Python (emulated) build here through
# aarch64-build, and runs a part of the suite. AARCH64_OPTIONAL=1 skips, with the reason,
# where the packages cannot be had.
check-aarch64:
	benchmarks/check_aarch64.sh

aarch64-build:
	$(call build_into,build/aarch64,$(AARCH64_PYTHON),$(AARCH64_ENV))

clean:
	rm -rf build pyext/*.egg-info pyext/handgrad/_C*.so pyext/handgrad/_build_config.py $(STAMP)
