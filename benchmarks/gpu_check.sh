#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and PyTorch with CUDA, in two calls that
# each end well inside 10 minutes on an H100 or H200:
#
#   benchmarks/gpu_check.sh test  OUT_DIR   build; the CUDA tests; compute-sanitizer memcheck
#                                           and racecheck over the kernel-path tests (~6 min)
#   benchmarks/gpu_check.sh bench OUT_DIR   build if needed; the GPU benchmark, each row
#                                           printed as it finishes, and the check of
#                                           cuBLASLt's RELU_BIAS epilogue (~4 min)
#
# Logs and tables go to OUT_DIR. Every step has its own time limit.
set -uo pipefail
mode=${1:?usage: benchmarks/gpu_check.sh test|bench OUT_DIR}
out=${2:?usage: benchmarks/gpu_check.sh test|bench OUT_DIR}
out=$(mkdir -p "$out" && cd "$out" && pwd)  # absolute, before changing directory
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

build() {
  echo "== build (sm_90)"
  local start=$(date +%s)
  if ! HANDGRAD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
      timeout 300 "$python" -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
    tail -40 "$out/build.log"
    echo "build failed"
    exit 1
  fi
  echo "built in $(( $(date +%s) - start )) s"
}

built() {
  "$python" -c "import handgrad, sys; sys.exit(0 if handgrad.cuda_built() else 1)" 2>/dev/null
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

case "$mode" in
test)
  build
  built || { echo "no CUDA kernels in the build"; exit 1; }
  echo "== CUDA tests (marked cuda: every test's device case 'cuda', and tests/test_cuda.py)"
  workers=$("$python" -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
  timeout 240 "$python" -m pytest -q -p no:cacheprovider $workers -m cuda tests 2>&1 \
    | tee "$out/test_cuda.log" | tail -25
  tests=${PIPESTATUS[0]}
  status=0
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool (tests marked sanitizer)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 99 \
      "$python" -m pytest -q -p no:cacheprovider -m sanitizer tests/test_cuda.py > "$out/sanitizer_$tool.log" 2>&1
    code=$?
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$out/sanitizer_$tool.log" | tail -4
    echo "$tool exit $code"
    [ "$code" -eq 0 ] || status=1
  done
  echo "tests exit $tests, sanitizers $status"
  [ "$tests" -eq 0 ] && [ "$status" -eq 0 ]
  ;;
bench)
  built || build
  echo "== GPU benchmark"
  timeout 420 "$python" benchmarks/bench_layers.py --device cuda --rounds 3 --min-time 0.03 \
    --out "$out" 2> "$out/bench_progress.log" | tee "$out/bench_gpu.md"
  echo "== cuBLASLt's RELU_BIAS epilogue"
  timeout 60 "$python" benchmarks/gpu_relu_epilogue.py 2>&1 | tee "$out/relu_epilogue.txt"
  ;;
*)
  echo "unknown mode $mode: use test or bench"
  exit 2
  ;;
esac
