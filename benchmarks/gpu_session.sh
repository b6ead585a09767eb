#!/usr/bin/env bash
# GPU work in as few device calls as possible. Stages (default: all):
#   build  the CUDA extension (pip install --no-build-isolation -e ., sm_90 unless
#          TORCH_CUDA_ARCH_LIST says otherwise)
#   unit   the CPU suite's kernel, module and extension tests, on the GPU (real kernels at odd
#          small shapes, T = 0 and 1, empty experts, poisoned outputs)
#   tests  GPU tests and the self-check      tune   tile tuning (commit the JSON it writes)
#   bench  per-kernel and adapter benchmarks, and this host's cost per eager forward
# Everything lands under $OUT: session.log, the tuned configs, kernels.json, bench.json/.md.
# GPU_TESTS_K selects GPU tests (pytest -k), e.g. GPU_TESTS_K=triton, to split a long test
# stage over two device calls.
# Usage on the device machine, from the repo root:  bash benchmarks/gpu_session.sh [stage...]
set -uo pipefail
OUT=${OUT:-/tmp/moe_out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
stages=${*:-build unit tests tune bench}
run() { echo "+ $*" | tee -a "$LOG"; "$@" 2>&1 | tee -a "$LOG"; }
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for stage in $stages; do
  case $stage in
    build) run pip install --no-build-isolation --no-deps -e .
           run python -c "from moe_adapter_kernels import backends; print(backends.status('cuda'))" ;;
    unit)  run python -m pytest -q -rf -m "not gpu" --durations=10 tests/test_fused_ops.py \
               tests/test_fused_module.py tests/test_fused_backward.py tests/test_cuda_ext.py ;;
    tests) run python -m pytest -m gpu -q -rf --durations=15 ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} \
               tests/test_gpu.py
           run python -m moe_adapter_kernels.cli check --dtype float32 float16 bfloat16 ;;
    tune)  run python -m benchmarks.tune
           cp moe_adapter_kernels/ops/tuned/*.json "$OUT/" 2>/dev/null ;;
    bench) run python -m benchmarks.host --tokens 512
           run python -m benchmarks.kernels --json "$OUT/kernels.json"
           run python -m moe_adapter_kernels.cli bench --json "$OUT/bench.json" \
               --markdown "$OUT/bench.md" --plot "$OUT/bench.png"
           run python -m moe_adapter_kernels.cli bench --graphs --tokens 512 2048 8192 \
               --json "$OUT/bench-graphs.json" --markdown "$OUT/bench-graphs.md" ;;
    *) echo "unknown stage $stage (build, unit, tests, tune, bench)"; exit 2 ;;
  esac
done
