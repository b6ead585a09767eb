"""Per-kernel benchmark of the Triton pipeline (or, with ``--ops cuda``, the CUDA extension's)
at the paper's sizes, for profiling.

Each step's median time (triton.testing.do_bench), its counted FLOPs and the fewest bytes it
must move, achieved TFLOP/s and GB/s, and the share of the device's measured bf16 matmul and
copy ceilings (GEMMs against the former, the rest against the latter). Needs a CUDA GPU.

    python -m benchmarks.kernels --tokens 8192 65536 --json kernels.json
    python -m benchmarks.kernels --ops cuda --tokens 8192
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

from benchmarks.bench import DTYPES, ceilings, timer
from moe_adapter_kernels import MoEAdapter, MoEAdapterConfig, reference, torch_ops
from moe_adapter_kernels.autograd import op_set
from moe_adapter_kernels.config import MOE_PRESETS


def triton_gemm_module():
    """ops/grouped_gemm.py (imported here, not at the top: ``--ops cuda`` needs no Triton);
    the module, not the function of the same name that moe_adapter_kernels.ops exports."""
    return importlib.import_module("moe_adapter_kernels.ops.grouped_gemm")


def tuned_path(a, w, activation, preact=None, offsets=None) -> str:
    """" [cuBLAS]" or " [split]" where the tuned table sends this launch (forward, or dact
    given ``preact``) to cuBLAS (tuning.CUBLAS) or the split dact (tuning.SPLIT), else ""."""
    gg = triton_gemm_module()
    key = (gg.fwd_key(a, w, activation=activation) if preact is None
           else gg.dact_key(a, w, preact, activation, offsets=offsets))
    cfg = gg.pick_config(key, a)
    return " [cuBLAS]" if cfg.get("path") == "cublas" else " [split]" if cfg.get("split") else ""


def n_fast(w: torch.Tensor) -> torch.Tensor:
    """w (same shape and values) stored with its last two dims swapped, so that the
    transposed view the backward GEMMs read is contiguous."""
    return w.transpose(-1, -2).contiguous().transpose(-1, -2)


def steps(model: MoEAdapter, x: torch.Tensor, kernels: str = "triton"):
    """(name, fn, flops, bytes) for every forward and backward step of op set ``kernels``
    ("triton" or "cuda"), on real routed data."""
    ops = op_set(kernels)
    path = tuned_path if kernels == "triton" else (lambda *_, **__: "")
    cfg, p = model.config, dict(model.named_parameters())
    T, d, k, E = x.shape[0], cfg.d_in, cfg.top_k, cfg.num_experts
    F, Fu, D, S = cfg.expert_dim, cfg.expert_up, cfg.expert_out, cfg.shared_dim
    b = x.element_size()
    P = T * k
    w_in, b_in = p["norm_in.weight"], p.get("norm_in.bias")
    u, mean, rstd = ops.norm(x, w_in, b_in, cfg.norm, cfg.norm_eps)
    logits, ids, gates, counts, gate_sums = ops.route(u, p["w_gate"], k)
    sp, _, off, _ = ops.permute(ids, counts, gate_sums, E)
    act = cfg.expert_activation
    h, pre = ops.expert_up(u, p["w1"], sp, off, k, act, True)
    yp = ops.expert_down(h, p["w2"], sp, off, gates)
    hs, pre_s = ops.linear(u, p["shared_w1"], "silu", True)
    dz = torch.randn(T, D, device=x.device, dtype=x.dtype)
    dpre = ops.expert_dact(dz, p["w2"], pre, sp, off, gates, k, act)[0]
    dpre_s = ops.linear_dact(dz, p["shared_w2"], pre_s, "silu")
    hg = ops.scaled_activation(pre, act, gates, sp)
    dup = ops.expert_dx(dpre, p["w1"], sp, off)
    du_s = torch.randn(T, d, device=x.device, dtype=x.dtype)
    dgates, zeros_g, zeros_l = torch.randn_like(gates), torch.zeros_like(gates), torch.zeros_like(
        logits)
    daux = torch.ones((), device=x.device)
    grad_in = (dup, du_s, dgates, zeros_g, zeros_l, gates, ids, off, daux, E / T**2, p["w_gate"],
               x, w_in, b_in, mean, rstd, cfg.norm)
    dl = ops.input_grad(*grad_in)[1]
    _, mean_o, rstd_o, z = ops.combine(yp, dz, k, cfg.norm, p["norm_out.weight"],
                                       p.get("norm_out.bias"), cfg.norm_eps, True)
    ig_bytes = (P * d + 3 * T * d) * b + T * (4 * k * 4 + 2 * E * 4)
    rows = [
        ("norm_in", lambda: ops.norm(x, w_in, b_in, cfg.norm, cfg.norm_eps), 0, 2 * T * d * b),
        ("route", lambda: ops.route(u, p["w_gate"], k), 2 * T * d * E,
         T * d * b + T * E * 4 + P * 8),
        ("permute", lambda: ops.permute(ids, counts, gate_sums, E), 0, P * 4 * 3),
        ("expert_up", lambda: ops.expert_up(u, p["w1"], sp, off, k, act),
         2 * P * d * Fu, T * d * b + E * d * Fu * b + P * F * b),
        ("expert_down", lambda: ops.expert_down(h, p["w2"], sp, off, gates), 2 * P * F * D,
         P * F * b + E * F * D * b + P * D * b),
        (f"shared_up{path(u, p['shared_w1'], 'silu')}",
         lambda: ops.linear(u, p["shared_w1"], "silu"), 2 * T * d * S,
         T * d * b + d * S * b + T * S * b),
        ("shared_up cuBLAS+torch ops", lambda: torch_ops.linear(u, p["shared_w1"], "silu"),
         2 * T * d * S, T * d * b + d * S * b + T * S * b),
        (f"shared_down{path(hs, p['shared_w2'], 'identity')}",
         lambda: ops.linear(hs, p["shared_w2"], "identity"), 2 * T * S * D,
         T * S * b + S * D * b + T * D * b),
        ("shared_down cuBLAS", lambda: torch_ops.linear(hs, p["shared_w2"], "identity"),
         2 * T * S * D, T * S * b + S * D * b + T * D * b),
        ("combine", lambda: ops.combine(yp, dz, k, cfg.norm, p["norm_out.weight"],
                                        p.get("norm_out.bias"), cfg.norm_eps), 0,
         (P * D + 2 * T * D) * b),
        (f"bwd expert_dact{path(dz, p['w2'], act, pre, off)}",
         lambda: ops.expert_dact(dz, p["w2"], pre, sp, off, gates, k, act),
         2 * P * D * F, (T * D + E * F * D + 2 * P * Fu) * b),
        ("bwd g*act(pre)", lambda: ops.scaled_activation(pre, act, gates, sp), 0,
         (P * Fu + P * F) * b + P * 8),
        ("bwd g*act(pre) torch ops", lambda: torch_ops.scaled_activation(pre, act, gates, sp), 0,
         (P * Fu + P * F) * b + P * 8),
        ("bwd dW2", lambda: ops.weight_grad_op(hg, dz, off, sp, 0, k, None, "identity"),
         2 * P * F * D, (P * F + P * D + E * F * D) * b),
        ("bwd dW1", lambda: ops.weight_grad_op(u, dpre, off, sp, k, 0, None, "identity"),
         2 * P * d * Fu, (P * d + P * Fu + E * d * Fu) * b),
        ("bwd expert_dx", lambda: ops.expert_dx(dpre, p["w1"], sp, off), 2 * P * Fu * d,
         (P * Fu + E * d * Fu + P * d) * b),
        (f"bwd shared_dact{path(dz, p['shared_w2'], 'silu', pre_s)}",
         lambda: ops.linear_dact(dz, p["shared_w2"], pre_s, "silu"),
         2 * T * D * S, (T * D + S * D + 2 * T * S) * b),
        ("bwd shared_dact cuBLAS+torch ops",
         lambda: torch_ops.linear_dact(dz, p["shared_w2"], pre_s, "silu"),
         2 * T * D * S, (T * D + S * D + 2 * T * S) * b),
        # the shared MLP's other backward GEMMs run in cuBLAS (see autograd._mlp_backward)
        ("bwd shared_dW2 cuBLAS", lambda: reference.activation(pre_s, "silu").t() @ dz,
         2 * T * S * D, (2 * T * S + T * D + S * D) * b),
        ("bwd shared_dW1 cuBLAS", lambda: u.t() @ dpre_s, 2 * T * d * S,
         (T * d + T * S + d * S) * b),
        ("bwd shared_dx cuBLAS", lambda: dpre_s @ p["shared_w1"].t(), 2 * T * S * d,
         (T * S + S * d + T * d) * b),
        ("bwd norm_out", lambda: ops.norm_bwd(dz, z, p["norm_out.weight"],
                                              p.get("norm_out.bias"), mean_o, rstd_o, cfg.norm),
         0, 3 * T * D * b),
        ("bwd input_grad", lambda: ops.input_grad(*grad_in), 0, ig_bytes),
        ("bwd input_grad torch ops", lambda: torch_ops.input_grad(ops.norm_bwd, *grad_in), 0,
         ig_bytes),
        ("bwd gate_grad", lambda: ops.gate_grad(u, dl), 2 * T * d * E, T * d * b + T * E * 4),
        ("bwd gate_grad torch ops", lambda: torch_ops.gate_grad(u, dl), 2 * T * d * E,
         T * d * b + T * E * 4),
    ]
    if kernels != "triton":
        return rows
    # Probes of the backward's slower GEMMs. They read the weights transposed (k-fast B):
    # the same GEMMs on copies laid out n-fast, as the forward reads its B (same counts as the
    # row they copy) ...
    row_counts = {name.split(" [")[0]: (flops, nbytes) for name, _, flops, nbytes in rows}
    w1n, w2n, ws2n = (n_fast(p[n]) for n in ("w1", "w2", "shared_w2"))
    n_fast_rows = [
        ("bwd expert_dact", "W2", lambda: ops.expert_dact(dz, w2n, pre, sp, off, gates, k, act)),
        ("bwd expert_dx", "W1", lambda: ops.expert_dx(dpre, w1n, sp, off)),
        ("bwd shared_dact", "W2", lambda: ops.linear_dact(dz, ws2n, pre_s, "silu"))]
    rows += [(f"{base} ({w} copy, n-fast)", fn, *row_counts[base])
             for base, w, fn in n_fast_rows]
    # ... and the dact GEMMs without their epilogues (pre-activation load, act', gate
    # partials): the same GEMM writing dh (default tiles); the routed one also as the split
    # path the tuner races (that GEMM, then the epilogue as a pass of its own)
    gg = triton_gemm_module()
    split = gg.tuning.SPLIT[0]
    return rows + [
        (f"bwd expert_dact (split, {split['BLOCK_M']}x{split['BLOCK_N']} tiles)",
         lambda: gg.grouped_dact(dz, p["w2"], pre, act, offsets=off, pair_ids=sp, gather_div=k,
                                 gate=gates.reshape(-1), config=split),
         *row_counts["bwd expert_dact"]),
        ("bwd expert_dact GEMM alone", lambda: gg.grouped_gemm(
            dz, p["w2"].transpose(1, 2), offsets=off, pair_ids=sp, gather_div=k),
         2 * P * D * F, (T * D + E * F * D + P * F) * b),
        ("bwd shared_dact GEMM alone", lambda: gg.grouped_gemm(dz, p["shared_w2"].t()),
         2 * T * D * S, (T * D + S * D + T * S) * b)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--preset", default="paper", choices=list(MOE_PRESETS))
    ap.add_argument("--ops", default="triton", choices=["triton", "cuda"],
                    help="whose kernels to time (cuda: the C++ extension's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.kernels needs a CUDA GPU (the Triton kernels only run interpreted on "
              "a CPU, where timings mean nothing); nothing measured.")
        return 0
    bench = timer("cuda")
    ceil = ceilings(bench)
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, "
          f"copy {ceil['copy_tbps']:.2f} TB/s", file=sys.stderr)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    model = MoEAdapter(MoEAdapterConfig.preset(args.preset), backend="triton").cuda().to(dtype)
    rows = []
    for T in args.tokens:
        x = torch.randn(T, model.config.d_in, device="cuda", dtype=dtype)
        with torch.no_grad():
            for name, fn, flops, nbytes in steps(model, x, args.ops):
                ms = bench(fn)
                tflops, gbps = flops / ms / 1e9, nbytes / ms / 1e6
                share = (tflops / ceil["matmul_tflops"] if flops > 10 * nbytes
                         else gbps / 1e3 / ceil["copy_tbps"])
                rows.append(dict(tokens=T, step=name, ms=ms, tflops=tflops, gbps=gbps,
                                 share_of_ceiling=share))
    print("| T | step | ms | TFLOP/s | GB/s | share of ceiling |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['step']} | {r['ms']:.3f} | {r['tflops']:.1f} | "
              f"{r['gbps']:.0f} | {100 * r['share_of_ceiling']:.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": ceil, "device": torch.cuda.get_device_name(),
                       "dtype": args.dtype, "ops": args.ops, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
