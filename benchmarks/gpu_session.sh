#!/usr/bin/env bash
# One device call: GPU tests, self-check, tile tuning, then the benchmarks; logs, the tuned
# configs and JSON results under $OUT.
# Usage on the device machine, from the repo root:  bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/moe_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/device.txt"
python -m pytest -m gpu -q -x tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
python -m moe_adapter_kernels.cli check --dtype float32 float16 bfloat16 2>&1 | tee "$OUT/check.log"
python -m benchmarks.tune 2>&1 | tee "$OUT/tune.log"   # commit ops/tuned/*.json from $OUT
cp moe_adapter_kernels/ops/tuned/*.json "$OUT/" 2>/dev/null
python -m benchmarks.kernels --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
python -m moe_adapter_kernels.cli bench --json "$OUT/bench.json" --markdown "$OUT/bench.md" \
    "$@" 2>&1 | tee "$OUT/bench.log"
