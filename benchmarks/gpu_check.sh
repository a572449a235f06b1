#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and PyTorch with CUDA:
# build with the CUDA kernels, run the CUDA tests, run the GPU benchmark.
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# Logs and the benchmark table go to OUT_DIR. Each step has a time limit so that the
# whole check ends well inside 8 minutes on an H100 or H200.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
out=$(mkdir -p "$out" && cd "$out" && pwd)  # absolute, before changing directory
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

{ nvidia-smi; "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } \
  > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

echo "== build"
start=$(date +%s)
if ! HANDGRAD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} timeout 300 "$python" -m pip install --no-build-isolation --no-deps -e . \
    > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  echo "build failed"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
"$python" -c "import handgrad; assert handgrad.cuda_built(), 'no CUDA kernels in the build'; print('CUDA kernels: yes')"

echo "== CUDA tests"
timeout 200 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" | tail -15
tests=${PIPESTATUS[0]}

echo "== GPU benchmark"
timeout 240 "$python" benchmarks/bench_layers.py --device cuda --rounds 3 --min-time 0.05 --out "$out" \
  2> "$out/bench_progress.log" | tee "$out/bench_gpu.md"
bench=${PIPESTATUS[0]}

echo "tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
