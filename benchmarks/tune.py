"""Tune the GEMM tile configs on this GPU and commit them (moe_adapter_kernels/ops/tuned/).

Runs one forward and backward of the adapter per token count while recording every GEMM
launch, times each of ``tuning.CANDIDATES`` for each distinct launch shape, and writes the
fastest per (kernel, variant, dtype, N, K, row bucket) to ``ops/tuned/<device>.json``.

    python -m benchmarks.tune --tokens 512 2048 8192 65536
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from benchmarks.bench import DTYPES
from moe_adapter_kernels import MoEAdapter, MoEAdapterConfig
from moe_adapter_kernels.config import MOE_PRESETS
from moe_adapter_kernels.ops import tuning

# the module, not the function of the same name that moe_adapter_kernels.ops exports
gg = importlib.import_module("moe_adapter_kernels.ops.grouped_gemm")


def record_launches(model: MoEAdapter, x: torch.Tensor) -> list:
    """Every (key, run(config)) of the GEMM launches of one forward and backward."""
    calls = []
    originals = gg.grouped_gemm, gg.grouped_dact

    def gemm(a, b, **kw):
        calls.append((gg.fwd_key(a, b, **kw), lambda cfg: originals[0](a, b, config=cfg, **kw)))
        return originals[0](a, b, **kw)

    def dact(dc, w, preact, activation, **kw):
        calls.append((gg.dact_key(dc, w, preact, activation, **kw),
                      lambda cfg: originals[1](dc, w, preact, activation, config=cfg, **kw)))
        return originals[1](dc, w, preact, activation, **kw)

    gg.grouped_gemm, gg.grouped_dact = gemm, dact
    try:
        xi = x.clone().requires_grad_(True)
        (model(xi).float().square().mean() + model.aux_loss).backward()
    finally:
        gg.grouped_gemm, gg.grouped_dact = originals
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192, 65536])
    ap.add_argument("--presets", nargs="+", default=["paper"], choices=list(MOE_PRESETS))
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.tune needs a CUDA GPU; nothing tuned.")
        return 0
    import triton.testing

    def timer(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    device = tuning.device_key()
    for preset in args.presets:
        model = MoEAdapter(MoEAdapterConfig.preset(preset), backend="triton").cuda().to(
            DTYPES[args.dtype])
        print(f"tuning {preset} on {device}:", file=sys.stderr)
        tune_model(model, args.tokens, device, timer, log=lambda s: print(s, file=sys.stderr))
    print(f"wrote {tuning.save(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
