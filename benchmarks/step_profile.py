"""Where a training step's time goes: torch.profiler over forward+backward steps of the MoE
adapter, with the device kernels (Triton, cuBLAS, PyTorch's elementwise ones) grouped by name
and sorted by time per step. The per-kernel benchmark times the steps we chose to time; this
shows everything a real step runs, glue included.

On a machine without a GPU it profiles the CPU ops instead (the torch backend by default:
the Triton kernels only run interpreted there) and says so.

    python -m benchmarks.step_profile --tokens 8192 65536 --json profile.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench import DTYPES, training_step
from moe_adapter_kernels import MoEAdapter, MoEAdapterConfig
from moe_adapter_kernels.config import MOE_PRESETS


def profile_steps(step, steps: int, on_gpu: bool) -> tuple[list[dict], float]:
    """(rows, total ms per step): each row {"name", "calls", "ms"} per step, for device
    kernels on a GPU, for CPU ops (self time) otherwise; sorted by time, largest first."""
    for _ in range(2):  # compile and allocate outside the profile
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        if on_gpu:
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.self_device_time_total
        else:
            us = evt.self_cpu_time_total
        if us > 0:
            rows.append({"name": evt.key, "calls": evt.count / steps, "ms": us / 1e3 / steps})
    rows.sort(key=lambda r: -r["ms"])
    return rows, sum(r["ms"] for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192])
    ap.add_argument("--dtype", default=None, choices=list(DTYPES),
                    help="default bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--preset", default="paper", choices=list(MOE_PRESETS))
    ap.add_argument("--backend", default=None, choices=["triton", "cuda", "torch"],
                    help="default triton on a GPU, torch on a CPU")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25, help="rows printed per token count")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    backend = args.backend or ("triton" if on_gpu else "torch")
    if not on_gpu:
        print("no GPU: profiling CPU ops (self CPU time) of the "
              f"{backend} backend", file=sys.stderr)
    torch.manual_seed(0)
    model = MoEAdapter(MoEAdapterConfig.preset(args.preset), backend=backend).to(device, dtype)
    out = []
    for T in args.tokens:
        x = torch.randn(T, model.config.d_in, device=device, dtype=dtype)
        xin = x.requires_grad_(True)
        rows, total = profile_steps(lambda: training_step(model, xin), args.steps, on_gpu)
        out.append({"tokens": T, "total_ms": total, "rows": rows})
        what = "kernel" if on_gpu else "CPU op"
        print(f"\nT = {T}: {total:.3f} ms of {'device' if on_gpu else 'CPU'} time per "
              f"forward+backward ({backend}, {dtype})")
        print(f"| {what} | calls/step | ms/step | share |\n|---|---|---|---|")
        for r in rows[:args.top]:
            name = r["name"] if len(r["name"]) <= 70 else r["name"][:67] + "..."
            print(f"| `{name}` | {r['calls']:g} | {r['ms']:.3f} | "
                  f"{100 * r['ms'] / total:.1f}% |")
    if args.json:
        meta = {"device": torch.cuda.get_device_name() if on_gpu else "CPU",
                "dtype": str(dtype), "backend": backend, "preset": args.preset,
                "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "profiles": out}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
