"""Peak memory of one training step (forward + backward), estimated on any machine, no GPU:
what ``moe-adapter bench`` reports as "peak MiB" (above the weights and their existing
gradients), for the Triton backend's allocation pattern and the dense adapter's.

Every shape in the fused pipeline is fixed by T and the config (no host sync sizes anything),
so the kernels' values do not matter for memory: the Triton launches are replaced by no-ops,
tensors are allocated on the CPU as the launchers would allocate them on the GPU (empty ones
zero-filled, so the PyTorch ops between launches index safely), and every storage a tensor op
creates is counted, rounded to 512 bytes, until its last tensor is gone. PyTorch ops (the
shared MLP's cuBLAS GEMMs in the backward, the dense adapter) run for real, on the CPU.
Checked against the H100 run of commit 0d3fe47 (bf16, paper preset, T = 512 / 2048): MoE 221 /
344 MiB here, 223 / 352 there; dense 150 / 358 here, 154 / 366 there.

    python -m benchmarks.memory --tokens 512 2048 [--models moe dense] [--autocast]

``--autocast``: fp32 weights, the step under torch.autocast in ``--dtype`` (mixed-precision
training; its bf16 weight copies count, as they do on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import weakref

from benchmarks.host import empty_ops, stubbed_launches, triton_backend_without_gpu


@contextlib.contextmanager
def peak_tracker():
    """Yields a dict whose "peak" is the most bytes held at once, after any tensor op inside,
    by the storages those ops created (each rounded up to 512 bytes, as the CUDA caching
    allocator does; a storage counts until its last tensor is gone)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    empty = empty_ops()
    live, seen = {}, {"peak": 0}

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in empty:
                out.zero_()
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):  # new storages only (not views, not in-place results)
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if storage.nbytes() and key not in live and key not in inputs:
                        live[key] = -(-storage.nbytes() // 512) * 512
                        weakref.finalize(storage, live.pop, key, None)
            seen["peak"] = max(seen["peak"], sum(live.values()))
            return out

    with Track():
        yield seen


def step_peak_mib(model, tokens: int, dtype, autocast: bool = False) -> float:
    """Peak MiB of a training step of ``model`` above what was in use before it (weights, the
    input, their gradients from a first step, as in ``benchmarks.bench``); ``autocast``: the
    step runs under torch.autocast in ``dtype``."""
    import torch

    from benchmarks.bench import training_step
    x = torch.randn(tokens, model.config.d_in, dtype=dtype).requires_grad_(True)
    mixed = torch.autocast("cpu", dtype=dtype, enabled=autocast)
    with mixed:
        training_step(model, x)
    with peak_tracker() as seen, mixed:
        training_step(model, x)
    return seen["peak"] / 2**20


def measure(tokens, models, preset: str, dtype_name: str, autocast: bool = False
            ) -> list[dict]:
    triton_backend_without_gpu("benchmarks.memory")
    import torch

    from benchmarks.bench import DTYPES
    from moe_adapter_kernels import (DenseAdapter, DenseAdapterConfig, MoEAdapter,
                                     MoEAdapterConfig)

    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    built = {"dense": lambda: DenseAdapter(DenseAdapterConfig.paper()),
             "moe": lambda: MoEAdapter(MoEAdapterConfig.preset(preset), backend="triton")}
    rows = []
    with stubbed_launches():
        for name in models:
            model = built[name]() if autocast else built[name]().to(dtype)
            for T in tokens:
                rows.append({"model": name, "tokens": T,
                             "peak_mib": step_peak_mib(model, T, dtype, autocast)})
                print(f"  {name} T={T}: {rows[-1]['peak_mib']:.0f} MiB", file=sys.stderr,
                      flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--models", nargs="+", default=["moe", "dense"], choices=["moe", "dense"])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--autocast", action="store_true",
                    help="fp32 weights, the step under torch.autocast in --dtype")
    args = ap.parse_args(argv)
    rows = measure(args.tokens, args.models, args.preset, args.dtype, args.autocast)
    how = f"fp32 weights, autocast to {args.dtype}" if args.autocast else args.dtype
    print(f"peak MiB of a training step above weights and gradients ({how}, preset "
          f"{args.preset}, estimated on the CPU with the Triton launches stubbed):")
    dense = {r["tokens"]: r["peak_mib"] for r in rows if r["model"] == "dense"}
    print("| T | model | peak MiB | mem/dense |\n|---|---|---|---|")
    for r in rows:
        ratio = (f"{r['peak_mib'] / dense[r['tokens']]:.3f}" if r["model"] != "dense"
                 and dense.get(r["tokens"]) else "")
        print(f"| {r['tokens']} | {r['model']} | {r['peak_mib']:.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
