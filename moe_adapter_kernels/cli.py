"""``moe-adapter``: ``info`` (presets, parameters, FLOPs), ``check`` (every backend against the
reference), ``bench`` (dense vs MoE timing; see benchmarks/)."""

from __future__ import annotations

import argparse
import sys

import torch

from . import __version__, backends
from .config import MOE_PRESETS, DenseAdapterConfig, MoEAdapterConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def presets_table() -> list[str]:
    """Markdown rows: every preset with its shape, parameters and FLOPs per token."""
    dense = DenseAdapterConfig.paper()
    rows = ["| preset | E choose k | expert | shared / aggregation | total | active | "
            "GFLOP/token |", "|---|---|---|---|---|---|---|",
            f"| dense (baseline) | - | - | {dense.d_in}->{dense.hidden_dim}->{dense.d_out} | "
            f"{_m(dense.total_parameters())} | {_m(dense.active_parameters())} | "
            f"{dense.flops_per_token() / 1e9:.3f} |"]
    for name in MOE_PRESETS:
        c = MoEAdapterConfig.preset(name)
        act = "SwiGLU " if c.expert_activation == "swiglu" else ""
        shared = f"{c.topology}: {c.d_in}->{c.shared_dim}->{c.d_out}"
        rows.append(f"| {name} | {c.num_experts}c{c.top_k} | {act}{c.d_in}->{c.expert_dim}->"
                    f"{c.expert_out} | {shared} | {_m(c.total_parameters())} | "
                    f"{_m(c.active_parameters())} | {c.flops_per_token() / 1e9:.3f} |")
    return rows


def cmd_info(args) -> int:
    print(f"moe-adapter-kernels {__version__}, torch {torch.__version__}")
    for name in backends.BACKENDS[1:]:
        ok, why = backends.status(name)
        print(f"  backend {name:<7} {'available' if ok else 'unavailable'}: {why}")
    print()
    print("\n".join(presets_table()))
    return 0


def cmd_check(args) -> int:
    from .check import SMALL, run_check
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = MoEAdapterConfig.preset(args.preset) if args.preset else SMALL
    what = f"preset {args.preset}" if args.preset else "a small config (pass --preset for others)"
    print(f"Checking every backend against the PyTorch reference on {device}, {what}:")
    dtypes = [DTYPES[d] for d in args.dtype]
    ok = run_check(device, args.tokens, cfg, dtypes)
    print("check: all available backends agree with the reference" if ok else
          "check: FAILED (see above)")
    return 0 if ok else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from benchmarks.bench import main as bench_main
        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="moe-adapter", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="backends, presets, parameter and FLOP counts")
    p = sub.add_parser("check", help="compare every available backend with the reference")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--tokens", type=int, default=67)
    p.add_argument("--preset", default=None, choices=list(MOE_PRESETS))
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=list(DTYPES))
    sub.add_parser("bench", help="time dense vs MoE adapters (moe-adapter bench -h)")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
