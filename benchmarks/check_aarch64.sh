#!/usr/bin/env bash
# make check-aarch64: handgrad for Linux aarch64, checked on this x86-64 machine.
#
#   1. set-up, once, cached in $AARCH64_CACHE (~/.cache/handgrad-aarch64):
#      - apt: the cross compiler (g++-aarch64-linux-gnu) and the emulator (qemu-user-static);
#      - an arm64 Python: Debian's arm64 packages, unpacked into a sysroot (apt-get download,
#        dpkg -x), which qemu-aarch64-static runs;
#      - pip: torch's aarch64 CPU wheel ($AARCH64_TORCH_SPEC), numpy and pytest for that Python;
#   2. the build: setup.py, run by the emulated Python so that torch.utils.cpp_extension
#      takes the aarch64 wheel's headers and libraries, compiles with aarch64-linux-gnu-g++
#      (which runs natively) into build/aarch64: at::vec's NEON path, the DEFAULT capability;
#   3. a chosen part of the suite under qemu-aarch64-static ($AARCH64_TESTS, less the tests
#      that $AARCH64_DESELECT, a pytest -k expression, leaves out; empty runs them all).
#
# AARCH64_OPTIONAL=1 (CI) turns a set-up that cannot be had (no apt, no network, no package)
# into a skip with its reason, instead of a failure. The build and the tests always fail hard.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${AARCH64_CACHE:-$HOME/.cache/handgrad-aarch64}"
# PyPI's newest CPU-only aarch64 torch: from 2.11 on, its aarch64 wheels are CUDA 13 builds,
# whose libtorch_cpu needs NVIDIA's aarch64 libraries (libcudart, libcupti) to load at all.
TORCH_SPEC="${AARCH64_TORCH_SPEC:-torch==2.10.0}"
PY=3.11  # Debian bookworm's, and the wheels' cp311 tag
HOST_PYTHON="${HOST_PYTHON:-python3}"
SYSROOT="$CACHE/sysroot"
SITE="$CACHE/site-packages"
# The layer ops, the MLP, gradcheck and gradgradcheck (the double backward), determinism over
# 1-4 threads, and the error messages; less the float64-truth sweeps and the largest shapes,
# and of what is left each test's first case and one in $SAMPLE of the rest (tests/conftest.py):
# all of it took 32 minutes under emulation (2026-12-07), and x86-64 runs it all natively.
TESTS="${AARCH64_TESTS:-tests/test_ops.py tests/test_fused_mlp.py tests/test_mlp.py tests/test_gradcheck.py tests/test_second_order.py tests/test_errors.py tests/test_cpu_dispatch.py}"
DESELECT="${AARCH64_DESELECT-not float64 and not larger_shapes and not products_go_to_blas and not slots and not 65536 and not 3000 and not 8193 and not 100000}"
SAMPLE="${AARCH64_TEST_SAMPLE:-4}"

say() { echo "check-aarch64: $*"; }
unavailable() {
  if [ "${AARCH64_OPTIONAL:-0}" = 1 ]; then say "SKIPPED: $*"; exit 0; fi
  say "cannot set up: $*"; exit 1
}
started=$(date +%s)

# 1a. Tools, from apt.
missing=()
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v ninja >/dev/null || missing+=(ninja-build)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || unavailable "needs ${missing[*]}, and there is no apt-get here"
  [ "$(id -u)" = 0 ] || unavailable "needs ${missing[*]}: run as root, or apt-get install them"
  say "apt-get install ${missing[*]}"
  (apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null) \
    || unavailable "apt-get could not install ${missing[*]}"
fi

# 1b. An arm64 Python, unpacked from Debian's packages into a sysroot; qemu-aarch64-static
# finds its loader and libraries there (QEMU_LD_PREFIX).
PYTHON_DEBS="python$PY-minimal libpython$PY-minimal libpython$PY-stdlib libpython$PY-dev libc6 libstdc++6
  libgcc-s1 libgomp1 libexpat1 zlib1g libssl3 libffi8 libbz2-1.0 liblzma5 libuuid1"
if [ ! -x "$SYSROOT/usr/bin/python$PY" ]; then
  command -v apt-get >/dev/null || unavailable "needs Debian's arm64 python$PY packages, and there is no apt-get here"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    [ "$(id -u)" = 0 ] || unavailable "apt must know arm64 packages: dpkg --add-architecture arm64 (as root)"
    say "dpkg --add-architecture arm64; apt-get update"
    dpkg --add-architecture arm64 && apt-get update -qq || unavailable "apt-get update failed for arm64"
  fi
  rm -rf "$CACHE/debs" && mkdir -p "$CACHE/debs"
  say "apt-get download the arm64 packages of python$PY into $CACHE/debs, unpacked into $SYSROOT"
  # shellcheck disable=SC2086
  (cd "$CACHE/debs" && apt-get download $(printf '%s:arm64 ' $PYTHON_DEBS) 2>&1 | grep -v unsandboxed || true)
  [ "$(ls "$CACHE/debs"/*.deb 2>/dev/null | wc -l)" -ge "$(echo $PYTHON_DEBS | wc -w)" ] \
    || unavailable "apt-get download could not fetch the arm64 packages: $PYTHON_DEBS"
  rm -rf "$SYSROOT" && mkdir -p "$SYSROOT"
  for deb in "$CACHE"/debs/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
fi

# 1c. torch's aarch64 wheel and the test tools: pure-Python packages as pip resolves them
# here, then the compiled ones (torch, numpy, markupsafe, hypothesis) for aarch64 over them.
if [ ! -f "$SITE/.installed" ] || [ "$(cat "$SITE/.installed")" != "$TORCH_SPEC" ]; then
  say "pip install $TORCH_SPEC (manylinux_2_28_aarch64), numpy, pytest into $SITE"
  rm -rf "$SITE"
  "$HOST_PYTHON" -m pip install -q --target "$SITE" pytest hypothesis expecttest sympy jinja2 networkx \
      fsspec filelock typing-extensions setuptools \
    && "$HOST_PYTHON" -m pip install -q --target "$SITE" --upgrade --no-deps --only-binary=:all: \
      --platform manylinux_2_28_aarch64 --python-version $PY --implementation cp \
      "$TORCH_SPEC" numpy markupsafe hypothesis \
    || unavailable "pip could not fetch $TORCH_SPEC for manylinux_2_28_aarch64 and the test tools"
  if grep -q "^cuda: Optional\[str\] = '" "$SITE/torch/version.py"; then
    say "$TORCH_SPEC for aarch64 is a CUDA build ($(grep "^__version__" "$SITE/torch/version.py")): its"
    say "libtorch_cpu cannot load without NVIDIA's aarch64 libraries; choose a CPU wheel (AARCH64_TORCH_SPEC)"
    exit 1
  fi
  echo "$TORCH_SPEC" > "$SITE/.installed"
fi

# The emulated Python, as a command: subprocesses it starts (the compiler, ninja) are x86-64
# programs and run natively.
mkdir -p "$CACHE/bin"
cat > "$CACHE/bin/python" <<EOF
#!/bin/sh
export QEMU_LD_PREFIX="$SYSROOT"
export PYTHONPATH="\${PYTHONPATH:+\$PYTHONPATH:}$SITE"
exec qemu-aarch64-static "$SYSROOT/usr/bin/python$PY" "\$@"
EOF
chmod +x "$CACHE/bin/python"
AARCH64_PYTHON="$CACHE/bin/python"
say "set up in $(( $(date +%s) - started )) s: $("$AARCH64_PYTHON" -c 'import platform, sys, torch; print(f"Python {sys.version.split()[0]} on {platform.machine()}, torch {torch.__version__}")' 2>/dev/null)"

# 2. The cross build. Debian's Python.h includes <aarch64-linux-gnu/python3.11/pyconfig.h>,
# which the sysroot has.
step_started=$(date +%s)
make -C "$ROOT" --no-print-directory aarch64-build AARCH64_PYTHON="$AARCH64_PYTHON" \
  AARCH64_ENV="CC=aarch64-linux-gnu-gcc CXX=aarch64-linux-gnu-g++ CFLAGS='-I$SYSROOT/usr/include/python$PY -idirafter $SYSROOT/usr/include'"
BUILD="$ROOT/build/aarch64"
for library in "$BUILD"/handgrad/*.so; do
  aarch64-linux-gnu-readelf -h "$library" | grep -q "Machine:.*AArch64" || { say "$library is not an aarch64 library"; exit 1; }
done
say "built in $(( $(date +%s) - step_started )) s: $(cd "$BUILD/handgrad" && ls ./*.so | tr '\n' ' ')"

# 3. The tests, under emulation. OpenMP's idle threads sleep rather than spin, which under
# emulation on two cores would take the time from the threads with work; a test that still
# runs past two minutes prints every thread's stack.
step_started=$(date +%s)
cd "$ROOT"
# shellcheck disable=SC2086
OMP_WAIT_POLICY=PASSIVE HANDGRAD_TEST_SAMPLE="$SAMPLE" PYTHONPATH="$BUILD" "$AARCH64_PYTHON" -m pytest -q -p no:cacheprovider \
  -o faulthandler_timeout=120 ${DESELECT:+-k "$DESELECT"} $TESTS
say "tests ran in $(( $(date +%s) - step_started )) s under qemu-aarch64-static; $(( $(date +%s) - started )) s in all"
