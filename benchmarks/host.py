"""Host cost of one eager forward of the Triton backend: the Python and dispatch work our
code does around the kernels, with every Triton launch replaced by a no-op.

At small T the GPU finishes a kernel faster than the host issues the next, so this is what
the eager T = 512 row pays (the dense adapter issues ~5 launches). Runs on any machine, GPU
or not: CPU tensors, nothing computed (outputs are garbage). By default Triton's own
launcher is stubbed out too; ``--launcher`` keeps its Python side (argument binding and
specialization, the cache lookup; the kernels are compiled for sm_90 on first use, see
``benchmarks.sm90``) and stops where the driver would launch, so only the driver's own
launch cost is missing.

``--train`` measures a whole eager training step (forward, then backward of y.sum() + the
aux loss) instead, on the preset's topology with its widths cut to d_in = 128, d_out = 64,
expert 32, shared 128: the backward's PyTorch ops (the shared MLP's GEMMs) run for real on
the CPU, so they must be small, and the host cost depends on the number of ops, not on their
sizes. Keep T below d_in (the default 64), as at the paper's sizes (T < 2560), where the
shared MLP's first weight gets its own gradient node.

    python -m benchmarks.host --tokens 512 --iters 200
    python -m benchmarks.host --launcher
    python -m benchmarks.host --train
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time


def triton_backend_without_gpu(tool: str) -> None:
    """Let ``tool`` run the Triton backend on CPU tensors with its launches stubbed: the
    kernels must load through the compiled path's launchers (not the interpreter's), and the
    backend is declared usable although there is no GPU."""
    if (os.environ.pop("TRITON_INTERPRET", None) == "1"
            and "moe_adapter_kernels.ops" in sys.modules):
        raise RuntimeError(f"{tool}: the kernels were loaded under TRITON_INTERPRET=1; run it "
                           "in a fresh process without it")
    from moe_adapter_kernels import backends
    backends.triton_status = lambda: (True, f"launches stubbed by {tool}")


def empty_ops() -> set:
    """The aten ops that make uninitialised tensors (what the tools zero-fill, so the PyTorch
    ops between stubbed launches index safely)."""
    import torch
    aten = torch.ops.aten
    return {aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default,
            aten.empty_strided.default, aten.new_empty_strided.default}


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton launch inside is a no-op; yields the list that gets one entry per launch."""
    from triton.runtime.jit import JITFunction
    launched, run = [], JITFunction.run
    JITFunction.run = lambda self, *a, **k: launched.append(None)
    try:
        yield launched
    finally:
        JITFunction.run = run


def measure(tokens: int, iters: int, preset: str, launcher: bool = False,
            train: bool = False) -> dict:
    """Per forward (``train``: per training step, at reduced widths) over ``iters`` calls:
    {"total_us": median, "launches": count, "ops": {name: mean us}}. ``launcher``: Triton's
    launch path up to the driver runs (else a no-op)."""
    triton_backend_without_gpu("benchmarks.host")
    import torch
    # The unwritten outputs of stubbed kernels hold garbage: denormals would make the CPU ops
    # on them slow, and a second thread waiting on a busy core adds milliseconds.
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)

    from benchmarks.sm90 import jit_without_gpu
    from moe_adapter_kernels import MoEAdapter, MoEAdapterConfig, ops  # noqa: F401
    from moe_adapter_kernels.autograd import EAGER_KERNELS

    spent = collections.defaultdict(float)
    kernels = EAGER_KERNELS["triton"]
    for name, fn in list(vars(kernels).items()):
        def timed(*a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            out = _fn(*a, **k)
            spent[_name] += time.perf_counter() - t0
            return out
        setattr(kernels, name, timed)
    cfg = MoEAdapterConfig.preset(preset)
    if train:
        cfg = cfg.replace(d_in=128, d_out=64, expert_dim=32, shared_dim=cfg.shared_dim and 128)
    model = MoEAdapter(cfg, backend="triton")
    x = torch.randn(tokens, cfg.d_in, requires_grad=train)

    def step():
        if train:
            (model(x).sum() + model.aux_loss).backward()
        else:
            model(x)

    totals = []
    with contextlib.ExitStack() as stack, torch.set_grad_enabled(train):
        launched = stack.enter_context(jit_without_gpu() if launcher else stubbed_launches())
        for i in range(iters + 10):  # 10 warm-up calls (with --launcher: the compiles)
            if i == 10:
                spent.clear()
                first = len(launched)
            t0 = time.perf_counter()
            step()
            totals.append(time.perf_counter() - t0)
        launches = (len(launched) - first) / iters
    totals = sorted(totals[10:])
    return {"total_us": 1e6 * totals[len(totals) // 2], "launches": launches,
            "ops": {n: 1e6 * s / iters for n, s in sorted(spent.items(), key=lambda kv: -kv[1])}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, help="default: 512, with --train 64")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--launcher", action="store_true",
                    help="keep Triton's launch path up to the driver (compiles for sm_90 once)")
    ap.add_argument("--train", action="store_true",
                    help="a training step (forward + backward) at reduced widths")
    args = ap.parse_args(argv)
    tokens = args.tokens or (64 if args.train else 512)
    r = measure(tokens, args.iters, args.preset, args.launcher, args.train)
    how = "run up to the driver" if args.launcher else "stubbed"
    what = "training step (widths reduced)" if args.train else "forward"
    print(f"host cost of one eager {what}, T={tokens}, preset {args.preset}, Triton "
          f"launches {how} (mean per op over {args.iters} calls):")
    for name, us in r["ops"].items():
        if us:
            print(f"  {name:14s} {us:7.1f} us")
    print(f"module {what}: {r['total_us']:.1f} us (median), {r['launches']:.0f} Triton "
          f"launches per {'step' if args.train else 'forward'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
