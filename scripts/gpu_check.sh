#!/usr/bin/env bash
# One call on a GPU machine: build the extension (CUDA kernels included), run the GPU tests and the GPU benchmarks,
# and write everything under $OUT (default ./out): build.log, tests.log, bench.log, bench.json, env.txt.
# Run it from the repository root on the GPU machine:  OUT=gpu_out bash scripts/gpu_check.sh  (about 5-8 minutes on an
# H100). It installs nothing: torch, triton and pytest-benchmark must already be importable by `python`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
echo "== build"
pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 || {
  echo "build failed (see build.log); continuing on the torch fallbacks"; tail -20 "$OUT/build.log"; }
echo "== GPU tests"
python -m pytest -q tests/test_kernels.py tests/test_ops.py tests/test_sample.py tests/test_schedule.py \
  tests/test_papa_loss.py tests/test_methods.py 2>&1 | tee "$OUT/tests.log" | tail -5
echo "== GPU benchmarks"
python -m pytest -q -s bench/bench_gpu.py bench/bench_step.py --benchmark-json="$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.log" | grep -E "x,|->|passed|failed|skipped|Error" | tail -20
