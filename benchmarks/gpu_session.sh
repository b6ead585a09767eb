#!/usr/bin/env bash
# GPU work in as few device calls as possible. Stages (default: all):
#   build  the CUDA extension (python -m pip install --no-build-isolation -e ., sm_90 unless
#          TORCH_CUDA_ARCH_LIST says otherwise), in the background while later stages that do
#          not need it run; stages that need it wait for it
#   gtriton  GPU tests of the Triton backend (paper sizes, T up to 65536, no host sync, CUDA
#          graphs, determinism, > 2^31 elements, training run, compile, Qwen2-Audio)
#   unit   the CPU suite's kernel, module and extension tests, on the GPU (real kernels at odd
#          small shapes, T = 0 and 1, empty experts, poisoned outputs, random configs, bf16
#          among them), both backends;
#          UNIT_K selects some (pytest -k)
#   gcuda  the CUDA GEMMs' fragment-layout probes (tests/test_cuda_layouts.py), GPU tests of
#          the CUDA backend and Triton-vs-CUDA agreement, and the self-check
#   gpu    the GPU tests selected by GPU_TESTS_K (pytest -k; all when unset), both backends
#   tune   tile tuning (commit the JSON it writes)
#   bench  per-kernel benchmarks (Triton; the CUDA extension at T = 8192), adapter benchmarks,
#          and this host's cost per eager forward
#   profile  every kernel of a training step by device time (torch.profiler), T = 8192, 65536
#   first  what one call of a 15-minute lease can hold (run as `build first`): the GPU tests
#          but the slowest, the benchmark of both fused backends (T = 512..65536), the
#          profile at T = 8192; carry a precompiled Triton cache (benchmarks/precompile.py)
# What lands under $OUT (at most 8 files come back from the device tool): session.log;
# results.tgz (build.log, tuned configs, kernels.json, bench*.json/.md); and the caches that
# travel to the next call: the Triton kernel cache (triton.tgz.NN, 15 MB parts) and the built
# extension (ext.tgz: _C*.so and the hash of csrc/ it was built from). Unpack them into the
# git-ignored .gpucache/ here and name .gpucache in the next call's carry:
#   cp $FILES/triton.tgz.* $FILES/ext.tgz .gpucache/
# Each stage has a time limit; DEADLINE (seconds, default 560) bounds the whole script so that
# the caches are saved before the device tool's 600-second limit.
# Usage on the device machine, from the repo root:  bash benchmarks/gpu_session.sh [stage...]
set -uo pipefail
OUT=${OUT:-/tmp/moe_out}
DEADLINE=${DEADLINE:-560}
mkdir -p "$OUT" .gpucache
LOG="$OUT/session.log"
R="$OUT/r"  # small results, bundled into results.tgz at exit
mkdir -p "$R"
export PYTHONPATH=.:tests${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export TRITON_CACHE_DIR=/tmp/triton-cache XZ_OPT="-T0 -6"
stages=${*:-build gtriton unit gcuda tune bench profile}
say() { echo "$*" | tee -a "$LOG"; }
# run LIMIT cmd...: at most LIMIT seconds, and never past DEADLINE
run() {
  local limit=$1; shift
  local left=$((DEADLINE - SECONDS - 25))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then say "- skipped (deadline): $*"; return 1; fi
  say "+ [${SECONDS}s, limit ${limit}s] $*"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  ((rc == 124)) && say "!! timed out after ${limit}s: $*"
  return "$rc"
}
kernels_in_cache() { ls "$TRITON_CACHE_DIR"/*/*.cubin 2>/dev/null | wc -l; }
save_caches() {
  say "+ [${SECONDS}s] Triton kernels: $CARRIED carried in, $(($(kernels_in_cache) - CARRIED)) compiled here"
  say "+ [${SECONDS}s] saving caches to \$OUT"
  tar cJf - -C "$TRITON_CACHE_DIR" . | split -b 15m -d - "$OUT/triton.tgz."
  ls moe_adapter_kernels/_C*.so >/dev/null 2>&1 && tar czf "$OUT/ext.tgz" -C .gpucache csrc.sha \
    -C "$PWD/moe_adapter_kernels" $(cd moe_adapter_kernels && ls _C*.so)
  tar czf "$OUT/results.tgz" -C "$R" . && rm -rf "$R"
  ls -la "$OUT" | tee -a "$LOG"
}
CARRIED=0
trap save_caches EXIT
csrc_sha=$(cat csrc/*.cu csrc/*.cpp csrc/*.cuh csrc/*.h | sha256sum | cut -c1-16)
mkdir -p "$TRITON_CACHE_DIR"
ls .gpucache/triton.tgz.* >/dev/null 2>&1 && cat .gpucache/triton.tgz.* | tar xJf - -C "$TRITON_CACHE_DIR"
[[ -f .gpucache/ext.tgz ]] && tar xzf .gpucache/ext.tgz -C .gpucache
CARRIED=$(kernels_in_cache)
run 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
run 60 python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# gpu_tests [K [LIMIT]]: the GPU tests selected by pytest -k K (all without K)
gpu_tests() {
  run "${2:-300}" python -m pytest -m gpu -q -rf -n 4 --durations=15 -p no:cacheprovider \
      ${1:+-k "$1"} tests/test_gpu.py
}
# the CUDA GEMMs' fragment layouts on the hardware (a failure shows which operand was misread)
layout_probes() { run 60 python -m pytest -q -rf -p no:cacheprovider tests/test_cuda_layouts.py; }
BUILD_PID=
wait_build() {
  [[ -n $BUILD_PID ]] || return 0
  say "+ [${SECONDS}s] waiting for the extension build"
  wait "$BUILD_PID"; say "  build exit $? (log: build.log)"; BUILD_PID=
  tail -n 5 "$R/build.log" | tee -a "$LOG"
  run 60 python -c "from moe_adapter_kernels import backends; print(backends.status('cuda'))"
}
for stage in $stages; do
  case $stage in
    build)
      if ls .gpucache/_C*.so >/dev/null 2>&1 && [[ $(cat .gpucache/csrc.sha 2>/dev/null) == "$csrc_sha" ]]; then
        cp .gpucache/_C*.so moe_adapter_kernels/ && say "+ reusing the carried extension ($csrc_sha)"
      else
        echo "$csrc_sha" > .gpucache/csrc.sha
        say "+ [${SECONDS}s] building the extension in the background (build.log)"
        # python -m pip: a bare `pip` there belongs to another Python (no torch: the build
        # skipped the extension). An editable install may keep the built module outside the
        # source tree, which PYTHONPATH=. shadows: copy it in, or every run JIT-builds it
        (timeout 400 python -m pip install -v --no-build-isolation --no-deps -e . > "$R/build.log" 2>&1
         so=$(cd / && PYTHONPATH= python -c "import moe_adapter_kernels._C as m; print(m.__file__)" 2>> "$R/build.log")
         echo "installed extension module: ${so:-none}" >> "$R/build.log"
         [[ -n $so && ! -e moe_adapter_kernels/$(basename "$so") ]] && cp "$so" moe_adapter_kernels/) &
        BUILD_PID=$!
      fi ;;
    gtriton) gpu_tests "triton and not agree" ;;
    gpu)   wait_build
           gpu_tests "${GPU_TESTS_K:-}" ;;
    unit)  wait_build
           run 240 python -m pytest -q -rf -n 8 -m "not gpu" --durations=10 -p no:cacheprovider \
               ${UNIT_K:+-k "$UNIT_K"} tests/test_fused_ops.py tests/test_fused_module.py \
               tests/test_fused_backward.py tests/test_cuda_ext.py tests/test_random_configs.py ;;
    gcuda) wait_build
           layout_probes
           gpu_tests "cuda or agree"
           run 120 python -m moe_adapter_kernels.cli check --dtype float32 float16 bfloat16 ;;
    tune)  run 330 python -m benchmarks.tune
           cp moe_adapter_kernels/ops/tuned/*.json "$R/" 2>/dev/null ;;
    bench) wait_build
           run 60 python -m benchmarks.host --tokens 512
           run 120 python -m benchmarks.kernels --json "$R/kernels.json"
           run 90 python -m benchmarks.kernels --ops cuda --tokens 8192 \
               --json "$R/kernels-cuda.json"
           run 240 python -m moe_adapter_kernels.cli bench --json "$R/bench.json" \
               --markdown "$R/bench.md"
           run 120 python -m moe_adapter_kernels.cli bench --graphs --tokens 512 2048 8192 \
               --json "$R/bench-graphs.json" --markdown "$R/bench-graphs.md" ;;
    first) # the one call of a 15-minute lease, most needed first (NOTES.md): the GPU tests
           # but the slow ones (torch.compile, transformers, the 200-step run), the benchmark
           # of both fused backends, a kernel profile of a training step
           gpu_tests "triton and not agree and not compile and not qwen2 and not training_run" 150
           wait_build
           fused="triton cuda"  # without a built extension, each test worker would JIT-build it
           if ls moe_adapter_kernels/_C*.so >/dev/null 2>&1; then
             layout_probes
             gpu_tests "(cuda or agree) and not training_run and not bench_cli" 150
           else
             say "!! no built extension (build.log): the CUDA backend's tests and bench skipped"
             fused=triton
           fi
           run 180 python -m moe_adapter_kernels.cli bench --tokens 512 2048 8192 32768 65536 \
               --backends $fused --json "$R/bench.json" --markdown "$R/bench.md"
           run 90 python -m benchmarks.step_profile --tokens 8192 --top 30 \
               --json "$R/profile.json" ;;
    profile) run 150 python -m benchmarks.step_profile --tokens 8192 65536 --top 30 \
               --json "$R/profile.json" ;;
    *) say "unknown stage $stage (build, gtriton, unit, gcuda, gpu, tune, bench, profile, first)"; exit 2 ;;
  esac
done
wait_build
