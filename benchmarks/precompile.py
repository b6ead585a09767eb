"""Compile, on a machine without a GPU, the Triton kernels that a GPU session will launch, into
a Triton cache that travels to the device, so the device's minutes go to running kernels
rather than compiling them (benchmarks/gpu_session.sh unpacks ``.gpucache/triton.tgz.*`` and
reports how many kernels it found there and how many it had to compile).

Triton reuses a carried kernel only when its cache key matches, and the key hashes Triton's
own files (its compiled library too, which differs between Python versions), the kernel's
source, its argument specialization and the target. So run this with the device image's
Python and Triton (as of 2026-12: Python 3.12, triton 3.6.0; the torch version does not
matter) on this checkout:

    python3.12 -m venv /tmp/v312 && /tmp/v312/bin/pip install torch numpy
    /tmp/v312/bin/pip install --no-deps triton==3.6.0
    /tmp/v312/bin/python -m benchmarks.precompile --out .gpucache

It fills the Triton cache at the path gpu_session.sh gives Triton on the device
(/tmp/triton-cache: the cache's index files hold absolute paths) and packs it into
``.gpucache/triton.tgz.NN``.

Each case runs the module (Triton backend; an inference forward and/or a training step) on
CPU tensors with every launch stopping after its compile for sm_90 (``benchmarks.sm90``), the
GEMM tiles taken from the table an sm_90 device without its own reads
(``tuning.STAND_INS``). Nothing is computed: tensors the launchers allocate are zero-filled
(so the PyTorch ops between launches index safely) and PyTorch's matrix products return
zeros of their shape. The default cases are what gpu_session.sh's `first` stage runs (the GPU
tests at paper sizes, the benchmark).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench import GPU_TOKENS
from benchmarks.host import empty_ops, triton_backend_without_gpu

# gpu_session.sh's TRITON_CACHE_DIR: a cache's group files name their members by absolute path
DEVICE_CACHE = "/tmp/triton-cache"
# (presets, dtypes, token counts, modes): the benchmark, then tests/test_gpu.py's cases
DEFAULT_CASES = [
    (["paper"], ["bfloat16"], GPU_TOKENS, ["infer", "train"]),
    (["paper"], ["bfloat16"], [4096], ["train"]),
    (["paper"], ["bfloat16", "float16", "float32"], [4099], ["train"]),
    (["paper", "post-swiglu", "16c4", "8c1"], ["bfloat16", "float16", "float32"],
     [1, 777, 8192], ["train"]),
]


@contextlib.contextmanager
def nothing_computed():
    """PyTorch ops inside: new empty tensors are zero-filled, matrix products return zeros."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map_only

    aten, empty = torch.ops.aten, empty_ops()
    products = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}

    class Skip(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in products:
                meta = func(*tree_map_only(torch.Tensor, lambda t: t.to("meta"), args),
                            **kwargs)
                return torch.zeros(meta.shape, dtype=meta.dtype)
            out = func(*args, **kwargs)
            return out.zero_() if func in empty else out

    with Skip():
        yield


@contextlib.contextmanager
def stand_in_tiles(table: str, picked: dict):
    """The GEMM launchers read ``table`` (as a GPU would) although the tensors are on the CPU;
    every tuning key looked up lands in ``picked`` with the config it got."""
    import importlib

    gg = importlib.import_module("moe_adapter_kernels.ops.grouped_gemm")
    wg = importlib.import_module("moe_adapter_kernels.ops.weight_grad")
    original = gg.pick_config

    def pick(key, a):
        picked[key] = gg.tuned_config(table, key, a.dtype)
        return picked[key]

    gg.pick_config = wg.pick_config = pick
    try:
        yield
    finally:
        gg.pick_config = wg.pick_config = original


def expand(cases):
    return [(p, d, t, m) for presets, dtypes, tokens, modes in cases for p in presets
            for d in dtypes for t in tokens for m in modes]


def precompile(cases, table: str | None = None, say=print) -> dict:
    """Compile every kernel the (preset, dtype, T, mode) cases launch; returns {"kernels":
    kernels compiled or found in the cache, "picked": {tuning key: config}}."""
    triton_backend_without_gpu("benchmarks.precompile")
    import torch

    from benchmarks.bench import training_step
    from benchmarks.sm90 import jit_without_gpu
    from moe_adapter_kernels import MoEAdapter, MoEAdapterConfig
    from moe_adapter_kernels.ops import tuning

    table = table or tuning.STAND_INS[(9, 0)]
    picked, kernels = {}, set()
    cases = expand(cases)
    with stand_in_tiles(table, picked), jit_without_gpu() as built, nothing_computed():
        for i, (preset, dtype_name, T, mode) in enumerate(cases, 1):
            t0, n0 = time.perf_counter(), len(built)
            dtype = getattr(torch, dtype_name)
            model = MoEAdapter(MoEAdapterConfig.preset(preset), backend="triton").to(dtype)
            x = torch.zeros(T, model.config.d_in, dtype=dtype)
            if mode == "train":
                training_step(model, x.requires_grad_(True))
            else:
                with torch.no_grad():
                    model(x)
            new = {k.hash for k in built[n0:]} - kernels
            kernels |= new
            say(f"[{i}/{len(cases)}] {preset} {dtype_name} T={T} {mode}: {len(new)} new "
                f"kernels ({time.perf_counter() - t0:.0f} s)")
    return {"kernels": len(kernels), "picked": picked}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.precompile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".gpucache",
                    help="folder for triton.tgz.NN (15 MB parts), as gpu_session.sh reads them")
    ap.add_argument("--cache", default=DEVICE_CACHE,
                    help="the Triton cache to fill (kept between runs: only new kernels "
                    "compile); the device finds the kernels only at the same path")
    ap.add_argument("--presets", nargs="+", help="with --dtypes/--tokens/--modes: these "
                    "cases instead of the default ones")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192])
    ap.add_argument("--modes", nargs="+", choices=["infer", "train"], default=["train"])
    args = ap.parse_args(argv)
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    for name in get_cache_invalidating_env_vars():  # part of the key; the device sets none
        say(f"unsetting {name}: it would be part of every kernel's cache key")
        os.environ.pop(name)
    cache = Path(args.cache).resolve()
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    say(f"Python {sys.version.split()[0]}, triton {triton.__version__}, cache {cache}: the "
        "device reuses these kernels only if its Python and Triton are the same")
    if str(cache) != DEVICE_CACHE:
        say(f"note: the device looks for its kernels under {DEVICE_CACHE}, not {cache}")
    cases = ([(args.presets, args.dtypes, args.tokens, args.modes)] if args.presets
             else DEFAULT_CASES)
    before = len(list(cache.glob("*/*.cubin")))
    r = precompile(cases, say=say)
    compiled = len(list(cache.glob("*/*.cubin"))) - before
    for key, cfg in sorted(r["picked"].items()):
        print(f"  {key}: " + " ".join(f"{k}={v}" for k, v in cfg.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("triton.tgz.*"):
        old.unlink()
    subprocess.run(f"tar cJf - -C '{cache}' . | split -b 15m -d - '{out}/triton.tgz.'",
                   shell=True, check=True, env=dict(os.environ, XZ_OPT="-T0 -6"))
    parts = sorted(out.glob("triton.tgz.*"))
    size = sum(p.stat().st_size for p in parts) / 2**20
    print(f"{r['kernels']} kernels for sm_90 ({compiled} compiled now, the rest found in "
          f"{cache}); packed into {len(parts)} part(s), {size:.1f} MiB, under {out} (name it "
          "in the device call's carry)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
