"""Compile every Triton kernel variant the launchers use to an sm_90 (Hopper) cubin, with no
GPU: launches are recorded instead of run, then compiled ahead of time. Run as a script in a
process without TRITON_INTERPRET (tests/test_sm90_compile.py does); prints one line a variant.
"""

import multiprocessing
import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "needs the real compiler, not the interpreter"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.int32: "i32", torch.int64: "i64"}
RECORDED = {}
ITEMS = []  # RECORDED's entries in a fixed order, for the compile workers
HOPPER_SMEM = 227 * 1024  # the most shared memory one block may use on an H100 / H200


def record(self, *args, grid, warmup, **kwargs):
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = self.signature.bind(*args, **kwargs)
    sig, const = {}, {}
    for p in self.params:
        v = bound.arguments[p.name]
        if p.is_constexpr or v is None:
            sig[p.name], const[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i64" if abs(v) >= 2**31 else "i32"
        else:
            sig[p.name] = "fp32"
    key = (self.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(
        (k, str(v)) for k, v in const.items())), tuple(sorted(opts.items())))
    RECORDED[key] = (self, sig, const, opts)


def exercise(dtype):
    """Call every launcher with small valid inputs (CPU tensors; nothing runs)."""
    import importlib
    combine, grouped_gemm, input_grad, norm, permute, router, scaled_activation, weight_grad = (
        importlib.import_module(f"moe_adapter_kernels.ops.{m}") for m in
        ("combine", "grouped_gemm", "input_grad", "norm", "permute", "router",
         "scaled_activation", "weight_grad"))
    T, d, E, k, F, D = 70, 72, 8, 4, 24, 40
    x = torch.randn(T, d).to(dtype)
    for kind in ("layernorm", "rmsnorm"):
        w, b = torch.ones(d, dtype=dtype), torch.zeros(d, dtype=dtype)
        norm.norm_forward(x, kind, w, b if kind == "layernorm" else None, 1e-5)
        norm.norm_backward(x, x, kind, w, b if kind == "layernorm" else None,
                           torch.zeros(T), torch.ones(T))
    router.route_forward(x, torch.randn(d, E).to(dtype), k)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int()
    counts = torch.zeros(triton.cdiv(T, router.BLOCK_T), E, dtype=torch.int32)
    permute.permute_forward(ids, counts, counts.float(), E)
    sp = torch.argsort(ids.flatten(), stable=True).int()
    off = torch.zeros(E + 1, dtype=torch.int32)
    gates = torch.rand(T * k)
    for act, width in (("silu", F), ("swiglu", 2 * F), ("identity", F), ("gelu", F)):
        w1 = torch.randn(E, d, width).to(dtype)
        b1 = torch.randn(E, width).to(dtype)
        grouped_gemm.grouped_gemm(x, w1, offsets=off, pair_ids=sp, gather_div=k, activation=act,
                                  save_preact=True)
        grouped_gemm.grouped_gemm(x, w1, offsets=off, pair_ids=sp, gather_div=k, activation=act,
                                  save_preact=True, bias=b1)
        grouped_gemm.grouped_gemm(x, w1, offsets=off, pair_ids=sp, gather_div=k, activation=act)
        pre = torch.randn(T * k, width).to(dtype)
        for split in (None, grouped_gemm.tuning.SPLIT[0]):  # fused, or GEMM + epilogue pass
            grouped_gemm.grouped_dact(x[:, :D].contiguous(), torch.randn(E, F, D).to(dtype),
                                      pre, act, offsets=off, pair_ids=sp, gather_div=k,
                                      gate=gates, config=split)
        for bias_grad in (False, True):
            weight_grad.weight_grad(pre, x, offsets=off, pair_ids=sp, b_gather_div=k,
                                    scale=gates, a_activation=act, bias_grad=bias_grad)
        scaled_activation.scaled_activation_forward(pre, act, gates.view(T, k), sp)
    h = torch.randn(T * k, F).to(dtype)
    for b2 in (None, torch.randn(E, D).to(dtype)):
        grouped_gemm.grouped_gemm(h, torch.randn(E, F, D).to(dtype), offsets=off, pair_ids=sp,
                                  scatter=True, scale=gates, bias=b2)
    grouped_gemm.grouped_gemm(h, torch.randn(E, d, F).to(dtype).transpose(1, 2), offsets=off,
                              pair_ids=sp, scatter=True)
    weight_grad.weight_grad(x, h, offsets=off, pair_ids=sp, a_gather_div=k)
    weight_grad.weight_grad(x, h, offsets=off, pair_ids=sp, a_gather_div=k, bias_grad=True)
    ws = torch.randn(d, 56).to(dtype)
    for act in ("silu", "gelu", "identity"):
        for bias in (None, torch.randn(56).to(dtype)):
            grouped_gemm.grouped_gemm(x, ws, activation=act, save_preact=True, bias=bias)
            grouped_gemm.grouped_gemm(x, ws, activation=act, bias=bias)
        grouped_gemm.grouped_dact(torch.randn(T, 56).to(dtype), ws, x, act)
        weight_grad.weight_grad(x, x, a_activation=act)
        weight_grad.weight_grad(x, x, a_activation=act, bias_grad=True)
    grouped_gemm.grouped_gemm(torch.randn(T, 56).to(dtype), ws.t(), activation="none")
    dl = torch.randn(T, E)
    router.gate_grad_forward(x, dl)
    g2, dpairs = gates.view(T, k), torch.randn(T * k, d).to(dtype)
    stats = torch.zeros(T), torch.ones(T)
    for nk in ("layernorm", "rmsnorm", "none"):
        w = torch.ones(d, dtype=dtype) if nk != "none" else None
        b = torch.zeros(d, dtype=dtype) if nk == "layernorm" else None
        for du_pairs, shared, aux in ((dpairs, x, 1.0), (dpairs, None, 0.0), (None, None, 1.0)):
            input_grad.input_grad_forward(du_pairs, shared, g2, g2, dl, g2, ids, off,
                                          torch.ones(()), aux, torch.randn(d, E).to(dtype), x,
                                          w, b, *stats, nk)
    for nk in ("layernorm", "rmsnorm", "none"):
        w = torch.ones(D, dtype=dtype) if nk != "none" else None
        for shared in (None, torch.randn(T, D).to(dtype)):
            combine.combine_forward(h[:, :D] if D <= F else torch.randn(T * k, D).to(dtype), k,
                                    shared, nk, w, None, 1e-5, True)


def compile_one(i: int) -> tuple[bool, str]:
    """Compile recorded variant ITEMS[i] for sm_90: (ok, report line)."""
    (name, _, const, _), (fn, sig, consts, opts) = ITEMS[i]
    try:
        kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                                options=opts)
        smem = kernel.metadata.shared
        assert smem <= HOPPER_SMEM, f"needs {smem} bytes of shared memory"
        return True, f"ok   {name} {dict(const)} shared={smem}"
    except Exception as exc:  # report every failure, then fail
        return False, f"FAIL {name} {dict(const)}: {type(exc).__name__}: {str(exc)[:2000]}"


def main() -> int:
    JITFunction.run = record
    for dtype in (torch.bfloat16, torch.float32):  # fp16 takes the bf16 code paths
        exercise(dtype)
    assert RECORDED, "no kernel launch was recorded"
    ITEMS[:] = sorted(RECORDED.items(), key=lambda kv: kv[0][0])
    # One compile per core: forked workers inherit ITEMS (kernels cannot be pickled).
    with multiprocessing.get_context("fork").Pool(min(len(os.sched_getaffinity(0)), 8)) as pool:
        results = pool.map(compile_one, range(len(ITEMS)), chunksize=1)
    for _, line in results:
        print(line)
    failed = sum(not ok for ok, _ in results)
    print(f"{len(ITEMS) - failed} of {len(ITEMS)} kernel variants compiled for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
