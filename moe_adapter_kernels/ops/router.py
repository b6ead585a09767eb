"""Router: logits = u @ W_g in fp32, top-k (ties to the lowest index), softmax over the k
kept logits, and per-block expert counts and gate sums (for the permutation and the aux
loss). One launch. Plus the router's weight gradient u^T @ dlogits (``gate_grad``).

With 16-bit u and W_g the logits come from the tensor cores: each product of two fp16 or bf16
numbers is exact in fp32 and the sums are fp32, so this is the fp32 logit up to the order of
the additions; fp32 inputs take the exact (non-tf32) fp32 path."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check, check_tensor, custom_op, dot_in_fp32, pow2

BLOCK_T = 32  # tokens per router program; the permutation works on the same blocks


@triton.jit
def _router_kernel(U, Wg, Logits, Ids, Weights, BlockCounts, BlockGates, T, D,
                   stride_u, stride_w, E: tl.constexpr, K: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    ecols = tl.arange(0, BLOCK_E)
    e_ok = ecols < E
    dcols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dcols
        u = tl.load(U + rows64[:, None] * stride_u + dd[None, :],
                    mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
        w = tl.load(Wg + dd[:, None].to(tl.int64) * stride_w + ecols[None, :],
                    mask=(dd[:, None] < D) & e_ok[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(u.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(u, w, acc)
    tl.store(Logits + rows64[:, None] * E + ecols[None, :], acc,
             mask=row_ok[:, None] & e_ok[None, :])

    # top-k by repeated argmax over the experts not taken yet; ties go to the lowest index and
    # NaN ranks above everything (as in torch.topk), so every row gets K distinct experts
    score = tl.where(acc != acc, float("inf"), acc)
    free = tl.broadcast_to(e_ok[None, :], (BLOCK_T, BLOCK_E))
    slots = tl.arange(0, BLOCK_K)
    kept = tl.full([BLOCK_T, BLOCK_K], float("-inf"), tl.float32)
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(tl.where(free, score, float("-inf")), 1)
        idx = tl.min(tl.where(free & (score == best[:, None]), ecols[None, :], BLOCK_E), 1)
        hit = ecols[None, :] == idx[:, None]
        kept = tl.where(slots[None, :] == j, tl.sum(tl.where(hit, acc, 0.0), 1)[:, None], kept)
        ids = tl.where(slots[None, :] == j, idx[:, None], ids)
        free = free & ~hit
    top = tl.max(kept, 1)[:, None]
    z = tl.where(slots[None, :] < K, tl.exp(kept - top), 0.0)
    total = tl.sum(z, 1)[:, None]
    gates = z / total
    out_mask = row_ok[:, None] & (slots[None, :] < K)
    tl.store(Ids + rows64[:, None] * K + slots[None, :], ids, mask=out_mask)
    tl.store(Weights + rows64[:, None] * K + slots[None, :], gates, mask=out_mask)
    # the same gates laid out by expert (the same arithmetic, so equal values), summed per block
    routed = row_ok[:, None] & ~free & e_ok[None, :]
    by_expert = tl.where(routed, tl.exp(acc - top) / total, 0.0)
    tl.store(BlockCounts + pid * E + ecols, tl.sum(routed.to(tl.int32), 0), mask=e_ok)
    tl.store(BlockGates + pid * E + ecols, tl.sum(by_expert, 0), mask=e_ok)


def route_forward(u: torch.Tensor, w_gate: torch.Tensor, top_k: int):
    """Router on u [T, d] with w_gate [d, E].

    Returns logits [T, E] fp32, topk_ids [T, k] int32 (descending logit; ties to the lower
    index; NaN above everything, so a row always names k distinct experts), topk_weights
    [T, k] fp32 (softmax over the k kept logits), and per block of BLOCK_T tokens, block_counts
    [cdiv(T, BLOCK_T), E] int32 (pairs routed to each expert) and block_gates [cdiv(T,
    BLOCK_T), E] fp32 (the sum of their top-k weights).
    """
    check_tensor(u, "route", "u", 2)
    check_tensor(w_gate, "route", "w_gate", 2, device=u.device)
    T, d = u.shape
    check(w_gate.shape[0] == d, "route", "w_gate must be [{}, E], got {}", d, tuple(w_gate.shape))
    E = w_gate.shape[1]
    check(1 <= top_k <= E, "route", "top_k must be in [1, {}], got {}", E, top_k)
    check(T * top_k < 2**31, "route", "T * top_k must be < 2^31 (int32 pair ids), got {}",
          T * top_k)
    nb = cdiv(T, BLOCK_T)
    dev = u.device
    logits = torch.empty(T, E, device=dev, dtype=torch.float32)
    ids = torch.empty(T, top_k, device=dev, dtype=torch.int32)
    weights = torch.empty(T, top_k, device=dev, dtype=torch.float32)
    block_counts = torch.empty(nb, E, device=dev, dtype=torch.int32)
    block_gates = torch.empty(nb, E, device=dev, dtype=torch.float32)
    if T:
        _router_kernel[(nb,)](u, w_gate, logits, ids, weights, block_counts, block_gates, T, d,
                              u.stride(0), w_gate.stride(0), E=E, K=top_k, BLOCK_T=BLOCK_T,
                              BLOCK_E=pow2(E, 16), BLOCK_D=64, BLOCK_K=pow2(top_k, 2),
                              DOT_FP32=dot_in_fp32(u.dtype) or u.dtype != w_gate.dtype,
                              num_warps=4)
    return logits, ids, weights, block_counts, block_gates


@custom_op("moe_adapter::route")
def route(u: torch.Tensor, w_gate: torch.Tensor, top_k: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch op of :func:`route_forward`: (logits, topk_ids, topk_weights, block_counts,
    block_gates)."""
    return route_forward(u, w_gate, top_k)


@route.register_fake
def _(u, w_gate, top_k):
    T, E = u.shape[0], w_gate.shape[1]
    nb = cdiv(T, BLOCK_T)
    return (u.new_empty(T, E, dtype=torch.float32), u.new_empty(T, top_k, dtype=torch.int32),
            u.new_empty(T, top_k, dtype=torch.float32), u.new_empty(nb, E, dtype=torch.int32),
            u.new_empty(nb, E, dtype=torch.float32))


@triton.jit
def _gate_grad_kernel(U, DL, DWp, T, D, stride_u, E: tl.constexpr, SPLIT: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's partial u[rows]^T @ dlogits[rows] for one BLOCK_D slice of the gate's
    rows, over the SPLIT tokens of its split (fp32 products, exact from 16-bit u)."""
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    es = tl.arange(0, BLOCK_E)
    e_ok = es < E
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, T)
    acc = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        r_ok = rows < hi
        rows64 = rows.to(tl.int64)
        ut = tl.load(U + rows64[None, :] * stride_u + dd[:, None],
                     mask=d_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        dl = tl.load(DL + rows64[:, None] * E + es[None, :], mask=r_ok[:, None] & e_ok[None, :],
                     other=0.0)
        acc = tl.dot(ut, dl, acc, input_precision="ieee")
    tl.store(DWp + (split.to(tl.int64) * D + dd[:, None]) * E + es[None, :], acc,
             mask=d_ok[:, None] & e_ok[None, :])


GATE_GRAD_SPLIT = 512  # tokens per split of the gate's weight gradient


def gate_grad_forward(u: torch.Tensor, dlogits: torch.Tensor) -> torch.Tensor:
    """The router's weight gradient u^T @ dlogits [d, E] in fp32, for u [T, d] (any float
    dtype) and dlogits [T, E] fp32: partial sums over fixed token splits, then added in split
    order (deterministic; no fp32 copy of u)."""
    check_tensor(u, "gate_grad", "u", 2)
    check_tensor(dlogits, "gate_grad", "dlogits", 2, dtypes=(torch.float32,), device=u.device)
    T, d = u.shape
    check(dlogits.shape[0] == T, "gate_grad", "dlogits must have {} rows, got {}", T,
          dlogits.shape[0])
    E = dlogits.shape[1]
    splits = cdiv(T, GATE_GRAD_SPLIT)
    partial = torch.empty(splits, d, E, device=u.device, dtype=torch.float32)
    if T:
        BLOCK_D = 128
        _gate_grad_kernel[(cdiv(d, BLOCK_D), splits)](
            u, dlogits.contiguous(), partial, T, d, u.stride(0), E=E, SPLIT=GATE_GRAD_SPLIT,
            BLOCK_T=32, BLOCK_D=BLOCK_D, BLOCK_E=pow2(E, 16), num_warps=4)
    return partial.sum(0)


@custom_op("moe_adapter::gate_grad")
def gate_grad(u: torch.Tensor, dlogits: torch.Tensor) -> torch.Tensor:
    """Torch op of :func:`gate_grad_forward`: u^T @ dlogits [d, E] fp32."""
    return gate_grad_forward(u, dlogits)


@gate_grad.register_fake
def _(u, dlogits):
    return u.new_empty(u.shape[1], dlogits.shape[1], dtype=torch.float32)
