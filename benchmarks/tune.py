"""Tune the GEMM tile configs on this GPU and commit them (moe_adapter_kernels/ops/tuned/).

Runs one forward and backward of the adapter per token count while recording every GEMM
launch, times each of ``tuning.candidates(key)`` (the tile configs, plus cuBLAS for the shared
MLP's dense launches and the split path for the routed activation backward) for each distinct
launch shape, and writes the fastest per (kernel, variant, dtype, N, K, row bucket) to
``ops/tuned/<device>.json``.

    python -m benchmarks.tune --tokens 512 2048 8192 32768 65536
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import torch

from benchmarks.bench import DTYPES, training_step
from moe_adapter_kernels import MoEAdapter, MoEAdapterConfig
from moe_adapter_kernels.config import MOE_PRESETS
from moe_adapter_kernels.ops import tuning

# the module, not the function of the same name that moe_adapter_kernels.ops exports
gg = importlib.import_module("moe_adapter_kernels.ops.grouped_gemm")
wg = importlib.import_module("moe_adapter_kernels.ops.weight_grad")


def record_launches(model: MoEAdapter, x: torch.Tensor) -> list:
    """Every (key, run(config)) of the GEMM launches (forward, activation backward, weight
    gradient) of one forward and backward. A launch made inside another (the split dact's
    GEMM) is part of that one, not recorded on its own."""
    calls, depth = [], 0
    patched = [(gg, "grouped_gemm", gg.fwd_key), (gg, "grouped_dact", gg.dact_key),
               (wg, "weight_grad", wg.wgrad_key)]
    originals = [getattr(mod, name) for mod, name, _ in patched]

    def recorder(fn, key):
        def record(*args, **kw):
            nonlocal depth
            if depth:
                return fn(*args, **kw)
            calls.append((key(*args, **kw), lambda cfg: fn(*args, config=cfg, **kw)))
            depth += 1
            try:
                return fn(*args, **kw)
            finally:
                depth -= 1
        return record

    for (mod, name, key), fn in zip(patched, originals):
        setattr(mod, name, recorder(fn, key))
    try:
        training_step(model, x.clone().requires_grad_(True))
    finally:
        for (mod, name, _), fn in zip(patched, originals):
            setattr(mod, name, fn)
    return calls


def tune_model(model: MoEAdapter, tokens, device: str, timer, log=print) -> int:
    """Tune every distinct GEMM shape of ``model`` at each token count; returns how many."""
    done = set()
    for T in tokens:
        x = torch.randn(T, model.config.d_in, device=model.w1.device, dtype=model.w1.dtype)
        for key, run in record_launches(model, x):
            if key in done:
                continue
            best = tuning.tune(device, key, run, timer)
            done.add(key)
            log(f"  {key}: {best}")
    return len(done)


def triton_model(preset: str, dtype: str) -> MoEAdapter:
    return MoEAdapter(MoEAdapterConfig.preset(preset), backend="triton").cuda().to(DTYPES[dtype])


def precompile(args, jobs: int) -> None:
    """Compile every candidate's kernels in ``jobs`` parallel processes first (one candidate
    each, shapes from a small forward+backward), filling Triton's on-disk cache: the timing
    loop then compiles nothing, and compiling is most of a cold tuning run."""
    base = [sys.executable, "-m", "benchmarks.tune", "--presets", *args.presets,
            "--dtype", args.dtype, "--compile-only"]
    pending = list(range(len(tuning.tile_configs())))
    running = []
    while pending or running:
        while pending and len(running) < jobs:
            running.append(subprocess.Popen(base + [str(pending.pop(0))]))
        running[0].wait()
        running.pop(0)


def compile_candidate(args, index: int) -> None:
    cfg = tuning.tile_configs()[index]
    for preset in args.presets:
        model = triton_model(preset, args.dtype)
        x = torch.randn(512, model.config.d_in, device="cuda", dtype=model.w1.dtype)
        for key, run in record_launches(model, x):
            if cfg not in tuning.candidates(key):
                continue
            try:
                run(cfg)
            except Exception as e:  # e.g. out of shared memory: tune() skips it too
                print(f"candidate {cfg}: {type(e).__name__}", file=sys.stderr)
    torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192, 32768, 65536])
    ap.add_argument("--presets", nargs="+", default=["paper"], choices=list(MOE_PRESETS))
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--jobs", type=int, default=8,
                    help="processes compiling the candidates before timing (0: compile as "
                         "they are timed)")
    ap.add_argument("--compile-only", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.tune needs a CUDA GPU; nothing tuned.")
        return 0
    if args.compile_only is not None:
        compile_candidate(args, args.compile_only)
        return 0
    import triton.testing

    def timer(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    if args.jobs:
        print(f"compiling {len(tuning.tile_configs())} candidates in {args.jobs} processes...",
              file=sys.stderr)
        precompile(args, args.jobs)
    device = tuning.device_key()
    for preset in args.presets:
        model = triton_model(preset, args.dtype)
        print(f"tuning {preset} on {device}:", file=sys.stderr)
        tune_model(model, args.tokens, device, timer, log=lambda s: print(s, file=sys.stderr))
    print(f"wrote {tuning.save(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
