"""Static profile of the GEMM kernels' sm_90 machine code, on any machine (no GPU needed).

For each GEMM of the adapter at the paper's sizes (T = 8192, bf16) it builds the Triton
kernel as the GPU's JIT would (same argument specialization: 16-byte aligned pointers, ints
equal to 1 or divisible by 16; the committed tuned tile config of an H100), and, with nvcc on
PATH, the CUDA extension's GEMM kernels; then reads their SASS (Triton's bundled
``cuobjdump``) and prints registers, stack (spills), static shared memory, and the
instruction mix of the main loop: tensor-core ops (HGMMA: wgmma; HMMA: mma.sync),
``ldmatrix`` (LDSM), async copies (LDGSTS: cp.async; UTMALDG: TMA), plain global loads and
local-memory loads (LDL: spilled registers read back each step).

It cannot time anything; it shows what a kernel's loop asks of the hardware, which is how
the CUDA GEMMs' WMMA fragment loads were found to be 32-bit generic loads (BENCHMARKS.md).

    python -m benchmarks.sass            # Triton and CUDA kernels
    python -m benchmarks.sass --only cuda
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T, DTYPE = 8192, "bfloat16"


def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _functions(sass: str) -> dict[str, list[str]]:
    """The instructions of each function in a ``cuobjdump -sass`` listing."""
    funcs, name = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            name = m.group(1)
            funcs[name] = []
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and name:
            funcs[name].append((int(m.group(1), 16), m.group(2).strip()))
    return funcs


def loop_mix(instrs) -> dict:
    """Instruction counts of the longest backward-branch loop that holds tensor-core ops."""
    best = []
    for addr, text in instrs:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in instrs if int(m.group(1), 16) <= a <= addr]
            if any("MMA" in t for t in body) and len(body) > len(best):
                best = body

    def count(pattern):
        return sum(1 for t in best if re.search(pattern, t))

    return dict(loop=len(best), HGMMA=count(r"\bHGMMA\b"), HMMA=count(r"\bHMMA\b"),
                LDSM=count(r"\bLDSM\b"), LDGSTS=count(r"\bLDGSTS\b"),
                UTMALDG=count(r"\bUTMALDG\b"), LDG=count(r"\bLDG\."),
                LD_generic=count(r"\bLD\.E"), LDL=count(r"\bLDL\b"))


def resources(cubin: Path) -> dict[str, dict]:
    """REG / STACK (spilled registers live there) / SHARED per function, from cuobjdump
    -res-usage."""
    out = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                         text=True, check=True).stdout
    res, name = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        elif name and "REG:" in line:
            res[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED):(\d+)", line)}
    return res


def profile_cubin(cubin: Path) -> dict[str, dict]:
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                          text=True, check=True).stdout
    res = resources(cubin)
    return {name: dict(res.get(name, {}), **loop_mix(instrs))
            for name, instrs in _functions(sass).items()}


def triton_rows(tmp: Path) -> list[dict]:
    """Build the adapter's Triton GEMMs for sm_90 as the GPU's JIT would (nothing runs)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    from benchmarks.sm90 import jit_without_gpu
    from moe_adapter_kernels import MoEAdapterConfig
    from moe_adapter_kernels.ops import tuning
    gg = importlib.import_module("moe_adapter_kernels.ops.grouped_gemm")
    wg = importlib.import_module("moe_adapter_kernels.ops.weight_grad")
    cfg = MoEAdapterConfig.preset("paper")
    d, E, k, F, D, S = cfg.d_in, cfg.num_experts, cfg.top_k, cfg.expert_dim, cfg.d_out, \
        cfg.shared_dim
    P, dt = T * k, getattr(torch, DTYPE)
    table = tuning.STAND_INS[(9, 0)]  # the H100's committed table

    def e(*shape, dtype=dt):
        return torch.empty(*shape, dtype=dtype)

    x, h, dz, pre_s = e(T, d), e(P, F), e(T, D), e(T, S)
    sp, off = torch.zeros(P, dtype=torch.int32), torch.zeros(E + 1, dtype=torch.int32)
    off[-1] = P
    gates = e(P, dtype=torch.float32)

    def expert_dact(c):
        return gg.grouped_dact(dz, e(E, F, D), h, "silu", offsets=off, pair_ids=sp,
                               gather_div=k, gate=gates, config=c)

    dact_key = gg.dact_key(dz, e(E, F, D), h, "silu", offsets=off)
    steps = [  # (name, launcher(config), its tuning key)
        ("expert_up", lambda c: gg.grouped_gemm(x, e(E, d, F), offsets=off, pair_ids=sp,
                                                gather_div=k, activation="silu",
                                                save_preact=True, config=c),
         gg.fwd_key(x, e(E, d, F), offsets=off, pair_ids=sp, activation="silu")),
        ("expert_down", lambda c: gg.grouped_gemm(h, e(E, F, D), offsets=off, pair_ids=sp,
                                                  scatter=True, scale=gates, config=c),
         gg.fwd_key(h, e(E, F, D), offsets=off, pair_ids=sp)),
        ("shared_up", lambda c: gg.grouped_gemm(x, e(d, S), activation="silu",
                                                save_preact=True, config=c),
         gg.fwd_key(x, e(d, S), activation="silu")),
        ("expert_dact", expert_dact, dact_key),
        ("expert_dact split", lambda c: expert_dact(dict(c, split=True)), dact_key),
        ("shared_dact", lambda c: gg.grouped_dact(dz, e(S, D), pre_s, "silu", config=c),
         gg.dact_key(dz, e(S, D), pre_s, "silu")),
        ("dW1", lambda c: wg.weight_grad(x, h, offsets=off, pair_ids=sp, a_gather_div=k,
                                         config=c),
         wg.wgrad_key(x, h, offsets=off, pair_ids=sp)),
        ("dW2", lambda c: wg.weight_grad(h, dz, offsets=off, pair_ids=sp, b_gather_div=k,
                                         config=c),
         wg.wgrad_key(h, dz, offsets=off, pair_ids=sp)),
    ]
    rows = []
    with jit_without_gpu() as built:
        for name, launch, key in steps:
            config = gg.tuned_config(table, key, dt)
            built.clear()
            launch(config)
            for i, kernel in enumerate(built):
                cubin = tmp / f"{name}-{i}.cubin"
                cubin.write_bytes(kernel.asm["cubin"])
                (prof,) = profile_cubin(cubin).values()
                label = name
                tile = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages}".format(**config)
                if len(built) > 1:  # the split dact: its GEMM, then the epilogue pass
                    label += (" (GEMM)", " (epilogue pass)")[i]
                    tile = tile if i == 0 else "{}x{} w4".format(*gg.SPLIT_BLOCK)
                rows.append(dict(kernel=f"triton {label}", tile=tile, **prof))
    return rows


CUDA_NAMES = {  # mangled template instance -> what it is (bf16, as the paper preset runs)
    "_ZN3moe11gemm_kernelI13__nv_bfloat16Lb0ELb0ELb0EEEvNS_8GemmArgsE": "forward (W n-fast)",
    "_ZN3moe11gemm_kernelI13__nv_bfloat16Lb0ELb0ELb1EEEvNS_8GemmArgsE": "forward (W^T)",
    "_ZN3moe11gemm_kernelI13__nv_bfloat16Lb1ELb0ELb1EEEvNS_8GemmArgsE": "dact (W^T)",
    "_ZN3moe18weight_grad_kernelI13__nv_bfloat16EEvNS_14WeightGradArgsE": "weight grad",
}


def cuda_rows(tmp: Path) -> list[dict]:
    """The CUDA extension's bf16 GEMM kernels, compiled by nvcc for sm_90."""
    cubin = tmp / "grouped_gemm.cubin"
    subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-O3", "-std=c++17", "-I",
                    str(ROOT / "csrc"), str(ROOT / "csrc" / "grouped_gemm.cu"), "-o",
                    str(cubin)], check=True, capture_output=True, text=True)
    prof = profile_cubin(cubin)
    return [dict(kernel=f"cuda {what}", tile="128x128x32 w8 s3", **prof[name])
            for name, what in CUDA_NAMES.items()]


COLUMNS = ["REG", "STACK", "SHARED", "loop", "HGMMA", "HMMA", "LDSM", "LDGSTS", "UTMALDG",
           "LDG", "LD_generic", "LDL"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sass", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["triton", "cuda"], default=None)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "cuda":
            print("building the Triton GEMMs for sm_90 (T = 8192, bf16)...", file=sys.stderr)
            rows += triton_rows(Path(tmp))
        if args.only != "triton":
            if shutil.which("nvcc") is None:
                print("no nvcc on PATH: the CUDA kernels are left out", file=sys.stderr)
            else:
                print("compiling csrc/grouped_gemm.cu for sm_90...", file=sys.stderr)
                rows += cuda_rows(Path(tmp))
    print("| kernel | tile | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for r in rows:
        print(f"| {r['kernel']} | {r['tile']} | " +
              " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |")
    print("(loop: instructions of the main loop as compiled, taken or not; REG: registers per "
          "thread; STACK: bytes of stack per thread (spilled registers, call frames); SHARED: "
          "static bytes)",
          file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
