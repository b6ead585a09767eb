"""Dense 94.4M adapter vs MoE-Adapter, timed in one process on the same inputs.

GPU: median times from ``triton.testing.do_bench`` (CUDA events, after warm-up), peak memory,
achieved TFLOP/s and the ratio to the dense adapter, for every backend; the device's bf16 matmul
and copy ceilings are measured first. CPU (no GPU): the correctness self-check, then the torch
backend at reduced token counts, and it says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from moe_adapter_kernels import (DenseAdapter, DenseAdapterConfig, MoEAdapter, MoEAdapterConfig,
                                 __version__, backends)
from moe_adapter_kernels.config import MOE_PRESETS

GPU_TOKENS = [512, 2048, 8192, 32768, 65536]
CPU_TOKENS = [64, 256]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def timer(device: str):
    """A function (fn, grads) -> median milliseconds on this device."""
    if device == "cuda":
        import triton.testing

        def gpu(fn, grads=()):
            return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads),
                                           return_mode="median")
        return gpu

    def cpu(fn, grads=(), reps=3):
        fn()
        times = []
        for _ in range(reps):
            for g in grads:
                g.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return cpu


def ceilings(bench) -> dict:
    """Measured bf16 matmul TFLOP/s and device-to-device copy TB/s (read + write)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm = bench(lambda: a @ b)
    src = torch.randn(256 * 2**20, device="cuda")
    dst = torch.empty_like(src)
    cp = bench(lambda: dst.copy_(src))
    return {"matmul_tflops": 2 * n**3 / mm / 1e9, "copy_tbps": 2 * src.numel() * 4 / cp / 1e9}


def peak_memory(fn, device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def graphed(fn, grads):
    """fn captured in a CUDA graph after a warm-up on a side stream (kernels compiled, gradient
    buffers allocated); returns the graph's replay. The captured backward accumulates into the
    gradient buffers that exist at capture time."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    for t in grads:
        if t.grad is not None:
            t.grad.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def training_step(model, x) -> None:
    """The forward+backward every benchmark times: loss = mean(y^2), plus the MoE adapter's
    aux loss."""
    loss = model(x).float().square().mean()
    if getattr(model, "aux_loss", None) is not None:
        loss = loss + model.aux_loss
    loss.backward()


def measure(name, model, x, mode, bench, device, flops_per_token, graphs=False):
    """Median time of one forward (no grad) or forward+backward of ``model`` on x, eager or
    replayed from a CUDA graph, and the peak memory above what was allocated before (eager)."""
    xin = x.detach().requires_grad_(mode == "fwd+bwd")
    params = [p for p in model.parameters() if p.requires_grad]

    def fwd():
        with torch.no_grad():
            model(xin)

    def fwdbwd():
        training_step(model, xin)

    fn = fwd if mode == "fwd" else fwdbwd
    grads = params + [xin] if mode == "fwd+bwd" else []
    fn()  # compiles the kernels and allocates the gradients, which exist in timed runs too
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    peak = peak_memory(fn, device)
    ms = bench(graphed(fn, grads)) if graphs else bench(fn, grads)
    flops = flops_per_token * x.shape[0] * (1 if mode == "fwd" else 3)
    return {"model": name, "tokens": x.shape[0], "mode": mode, "ms": ms,
            "tflops": flops / ms / 1e9, "peak_bytes": None if peak is None else peak - base}


# The performance targets: the Triton backend's against the dense adapter (issue 5), the CUDA
# backend's against the Triton backend (issue 6), set for an H100 in bf16 and judged within
# one run: (label, model, mode (None: both), tokens it applies to, row value, limit).
TARGETS = [
    ("forward <= 0.85 x dense at T >= 8192", "moe-triton", "fwd", lambda T: T >= 8192,
     "ratio", 0.85),
    ("forward <= 1.0 x dense at T = 2048", "moe-triton", "fwd", lambda T: T == 2048,
     "ratio", 1.0),
    ("forward <= 1.5 x dense at T = 512", "moe-triton", "fwd", lambda T: T == 512, "ratio", 1.5),
    ("forward+backward <= 0.90 x dense at T >= 8192", "moe-triton", "fwd+bwd",
     lambda T: T >= 8192, "ratio", 0.90),
    ("training peak memory <= 0.8 x dense", "moe-triton", "fwd+bwd", lambda T: True,
     "mem_ratio", 0.8),
    ("forward and forward+backward <= 2 x triton at T >= 8192", "moe-cuda", None,
     lambda T: T >= 8192, "vs_triton", 2.0),
]


def target_verdicts(rows: list[dict]) -> list[dict]:
    """Each target that this run has rows for: {"target", "model", "met", "worst", "tokens",
    "mode"} (the worst value of the rows it applies to, and where)."""
    triton = {(r["tokens"], r["mode"]): r["ms"] for r in rows if r["model"] == "moe-triton"}

    def value(r, key):
        if key != "vs_triton":
            return r.get(key)
        ms = triton.get((r["tokens"], r["mode"]))
        return None if ms is None else r["ms"] / ms

    out = []
    for label, model, mode, applies, key, limit in TARGETS:
        vals = [(value(r, key), r["tokens"], r["mode"]) for r in rows
                if r["model"] == model and mode in (None, r["mode"]) and applies(r["tokens"])]
        vals = [v for v in vals if v[0] is not None]
        if vals:
            v, T, m = max(vals)
            out.append({"target": label, "model": model, "met": v <= limit, "worst": v,
                        "tokens": T, "mode": m})
    return out


def git_commit() -> str:
    """The checkout's short commit (MOE_BENCH_COMMIT overrides it: a copied tree's .git may
    be stale, as on a lent device machine)."""
    if os.environ.get("MOE_BENCH_COMMIT"):
        return os.environ["MOE_BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except Exception:
        return "unknown"


def tile_table(say) -> str | None:
    """The tuned tile table the Triton launches read on this GPU (None: default tiles), said
    aloud, with whether it stands in for this device's own."""
    from moe_adapter_kernels.ops import tuning
    own, used = tuning.device_key(), tuning.launch_table()
    if not tuning.table(used):
        say(f"no tuned tiles for {own}: default tiles (python -m benchmarks.tune tunes them)")
        return None
    say(f"tuned tiles: ops/tuned/{used}.json" + (f" (stand-in: {own} has no table of its own)"
                                                 if used != own else ""))
    return used


def format_table(rows: list[dict]) -> list[str]:
    """Markdown rows; "% matmul" is the achieved TFLOP/s as a share of the measured bf16 matmul
    ceiling (GPU only), "mem/dense" the peak-memory ratio."""
    out = ["| T | mode | model | ms | TFLOP/s | % matmul | peak MiB | MoE/dense | mem/dense |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        share = "-" if r.get("ceiling_share") is None else f"{100 * r['ceiling_share']:.0f}%"
        ratio = "" if r.get("ratio") is None else f"{r['ratio']:.3f}"
        mem = "" if r.get("mem_ratio") is None else f"{r['mem_ratio']:.3f}"
        out.append(f"| {r['tokens']} | {r['mode']} | {r['model']} | {r['ms']:.3f} | "
                   f"{r['tflops']:.1f} | {share} | {peak} | {ratio} | {mem} |")
    return out


def plot(rows: list[dict], title: str, path: str) -> bool:
    """MoE/dense time ratio against tokens, one panel per mode, one line per backend. Returns
    False (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        moe = [r for r in rows if r["mode"] == mode and r.get("ratio") is not None]
        for model in dict.fromkeys(r["model"] for r in moe):
            pts = [(r["tokens"], r["ratio"]) for r in moe if r["model"] == model]
            ax.plot(*zip(*pts), marker="o", label=model)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("time MoE / dense")
        ax.set_title(mode)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv):
    p = argparse.ArgumentParser(prog="moe-adapter bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help=f"token counts (GPU default {GPU_TOKENS}, CPU default {CPU_TOKENS})")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="GPU default bfloat16, CPU default float32")
    p.add_argument("--preset", default="paper", choices=list(MOE_PRESETS))
    p.add_argument("--backends", nargs="+", default=None,
                   help="MoE backends to time (default: every available one)")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--device", default=None, choices=["cuda", "cpu"])
    p.add_argument("--graphs", action="store_true",
                   help="GPU: time every model (dense too) replayed from a CUDA graph instead of "
                        "eager, which removes the host's launch overhead (matters at small T)")
    p.add_argument("--json", default="moe_adapter_bench.json", help="where to write results")
    p.add_argument("--markdown", default=None, help="also write the table as markdown here")
    p.add_argument("--plot", default=None,
                   help="also plot MoE/dense ratios to this image file (needs matplotlib)")
    p.add_argument("--skip-check", action="store_true", help="CPU: skip the self-check")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    tokens = args.tokens or (GPU_TOKENS if gpu else CPU_TOKENS)
    dtype = DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    if args.graphs and not gpu:
        say("--graphs needs a CUDA GPU")
        return 2
    status = 0
    if not gpu:
        say("No CUDA GPU: running the correctness self-check and a reduced CPU benchmark of "
            f"the torch backend (tokens {tokens}). GPU numbers need a GPU.")
        if not args.skip_check:
            from moe_adapter_kernels.check import run_check
            ok = run_check("cpu", printer=say)
            say("self-check:", "PASS" if ok else "FAIL")
            status = 0 if ok else 1
    names = args.backends or [b for b in backends.available_backends()
                              if gpu or b == "torch"]
    if args.graphs and "torch" in names:  # its per-expert loop sizes tensors on the host
        say("--graphs: skipping the torch backend (it syncs with the host, so a CUDA graph "
            "cannot capture it)")
        names.remove("torch")
    bench = timer(device)
    cpu_name = f"CPU ({platform.processor() or platform.machine()})"
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if gpu else cpu_name,
            "torch": torch.__version__, "package": __version__, "commit": git_commit(),
            "dtype": str(dtype).replace("torch.", ""), "preset": args.preset,
            "execution": "cuda-graphs" if args.graphs else "eager"}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if gpu:
        meta["tile_table"] = tile_table(say)
        say("measuring device ceilings (bf16 matmul, copy)...")
        meta["ceilings"] = ceilings(bench)
        say(f"  bf16 matmul {meta['ceilings']['matmul_tflops']:.0f} TFLOP/s, "
            f"copy {meta['ceilings']['copy_tbps']:.2f} TB/s")
    torch.manual_seed(0)
    dense = DenseAdapter(DenseAdapterConfig.paper()).to(device, dtype)
    moe_cfg = MoEAdapterConfig.preset(args.preset)
    moes = {}
    for b in names:
        m = MoEAdapter(moe_cfg, backend=b).to(device, dtype)
        moes[f"moe-{b}"] = m
    models = [("dense", dense, dense.flops_per_token())] + [
        (n, m, m.flops_per_token()) for n, m in moes.items()]
    total = len(tokens) * len(args.modes) * len(models)
    rows, i = [], 0

    def save(**extra):
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows, **extra}, f, indent=2)

    for T in tokens:
        x = torch.randn(T, moe_cfg.d_in, device=device, dtype=dtype)
        for mode in args.modes:
            dense = None
            for name, model, fpt in models:
                i += 1
                say(f"[{i}/{total}] T={T} {mode} {name} ...")
                r = measure(name, model, x, mode, bench, device, fpt, args.graphs)
                if gpu:
                    r["ceiling_share"] = r["tflops"] / meta["ceilings"]["matmul_tflops"]
                if name == "dense":
                    dense = r
                else:
                    r["ratio"] = r["ms"] / dense["ms"]
                    if r["peak_bytes"] is not None and dense["peak_bytes"]:
                        r["mem_ratio"] = r["peak_bytes"] / dense["peak_bytes"]
                say(f"    {r['ms']:.3f} ms" + (f", {r['ratio']:.3f}x dense" if "ratio" in r
                                                 else ""))
                rows.append(r)
                save()  # after every row: a run cut short keeps them
    table = format_table(rows)
    header = (f"{meta['device']}, {meta['dtype']}, {meta['execution']}, torch {meta['torch']}, "
              f"triton {meta['triton']}, commit {meta['commit']}, {meta['date']}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(header + "\n\n" + "\n".join(table) + "\n")
    if args.plot:
        if plot(rows, header, args.plot):
            say(f"plot written to {args.plot}")
        else:
            say("matplotlib is not installed: no plot written (pip install matplotlib)")
    print(header)
    print("\n".join(table))
    if gpu and dtype == torch.bfloat16:
        verdicts = target_verdicts(rows)
        save(targets=verdicts)
        print(f"Targets (set for an H100 in bf16; this run: {meta['device']}, "
              f"{meta['execution']}):")
        for v in verdicts:
            print(f"  {v['model']}: {v['target']}: {'met' if v['met'] else 'NOT met'} "
                  f"(worst {v['worst']:.3f} at T = {v['tokens']}, {v['mode']})")
    print(f"results written to {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
