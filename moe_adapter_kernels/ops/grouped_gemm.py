"""Grouped GEMM over experts' variable-length row ranges, with the row gather fused into the
A-load and the activation / gate weight fused into the epilogue.

Rows are in expert-sorted order: expert g owns rows offsets[g] .. offsets[g+1]. The grid is
sized by an upper bound on the number of M tiles, cdiv(rows, BLOCK_M) + groups, so no host
sync is needed; programs past the last tile exit at once. With ``offsets=None`` it is a plain
dense GEMM (one group of all rows), used for the shared / aggregation MLP.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, check_tensor, dot_in_fp32, interpreting

ACTIVATIONS = {"none": 0, "silu": 1, "swiglu": 2}


@triton.jit
def _tile_of_group(pid_m, Offsets, M, NUM_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Map an M-tile index to (group, first row, end row); group -1 past the last tile."""
    group = -1
    row_start = 0
    row_end = 0
    tiles_before = 0
    for g in range(NUM_GROUPS):
        lo = tl.load(Offsets + g)
        hi = tl.load(Offsets + g + 1)
        n_tiles = tl.cdiv(hi - lo, BLOCK_M)
        hit = (pid_m >= tiles_before) & (pid_m < tiles_before + n_tiles)
        group = tl.where(hit, g, group)
        row_start = tl.where(hit, lo + (pid_m - tiles_before) * BLOCK_M, row_start)
        row_end = tl.where(hit, hi, row_end)
        tiles_before += n_tiles
    return group, row_start, row_end


@triton.jit
def _grouped_gemm_kernel(
        A, B, C, PairIds, Scale, Offsets, M, N, K,
        stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_cm, stride_cn,
        NUM_GROUPS: tl.constexpr, GATHER_DIV: tl.constexpr, SCATTER: tl.constexpr,
        HAS_SCALE: tl.constexpr, ACT: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if NUM_GROUPS == 0:  # dense: one group of M rows
        group = 0
        row_start = pid_m * BLOCK_M
        row_end = M
    else:
        group, row_start, row_end = _tile_of_group(pid_m, Offsets, M, NUM_GROUPS, BLOCK_M)
        if group < 0:
            return
    rm = row_start + tl.arange(0, BLOCK_M)
    m_ok = rm < row_end
    if GATHER_DIV > 0 or SCATTER or HAS_SCALE:
        pair = tl.load(PairIds + rm, mask=m_ok, other=0).to(tl.int64)
    if GATHER_DIV > 0:
        a_row = pair // GATHER_DIV
    else:
        a_row = rm.to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    a_ptr = A + a_row[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptr = B + group.to(tl.int64) * stride_bg + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if ACT == 2:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if ACT == 2:  # SwiGLU: the up half sits N columns to the right of the gate half
            bu = tl.load(b_ptr + N * stride_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_FP32:
                acc_up = tl.dot(a, bu.to(tl.float32), acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a, bu, acc_up)
        a_ptr += BLOCK_K * stride_ak
        b_ptr += BLOCK_K * stride_bk
    if ACT == 1:
        acc = acc * tl.sigmoid(acc)
    if ACT == 2:
        acc = acc * tl.sigmoid(acc) * acc_up
    if HAS_SCALE:
        acc = acc * tl.load(Scale + pair, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    if SCATTER:
        out_row = pair
    else:
        out_row = rm.to(tl.int64)
    c_ptr = C + out_row[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def default_config(dtype: torch.dtype) -> dict:
    """Tile shapes: small under the interpreter (partial tiles in small tests), tensor-core
    sized on the GPU. Issue-5 autotuning replaces this."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, *, offsets: torch.Tensor | None = None,
                 pair_ids: torch.Tensor | None = None, gather_div: int = 0,
                 scatter: bool = False, scale: torch.Tensor | None = None,
                 activation: str = "none", out: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """C[rows] = act(A[rows] @ B[group]) (* scale[pair]) for every group's rows.

    a: [Ma, K]. b: [G, K, Nb] with offsets [G+1] int32 (grouped), or [K, Nb] (dense, one
    group). Output has M = offsets' last value rows when grouped, Ma rows when dense (the
    caller passes M through ``out``'s shape, or it is Ma): C [M, N] with N = Nb, or Nb / 2 for
    ``swiglu`` (b holds [gate | up]).
    pair_ids [M] int32: the pair id at each sorted row; ``gather_div`` > 0 reads A row
    pair // gather_div; ``scatter`` writes C row pair instead of the sorted row; ``scale`` [P]
    multiplies each row by scale[pair].
    """
    op = "grouped_gemm"
    check_tensor(a, op, "a", 2)
    dev = a.device
    grouped = offsets is not None
    check_tensor(b, op, "b", 3 if grouped else 2, dtypes=(a.dtype,), device=dev)
    check(activation in ACTIVATIONS, op, f"activation must be one of {list(ACTIVATIONS)}")
    K = a.shape[1]
    check(b.shape[-2] == K, op, f"b's reduction dim is {b.shape[-2]}, a has K={K}")
    n_out = b.shape[-1] // 2 if activation == "swiglu" else b.shape[-1]
    needs_pairs = gather_div > 0 or scatter or scale is not None
    check(not needs_pairs or pair_ids is not None, op, "gather/scatter/scale need pair_ids")
    if grouped:
        check_tensor(offsets, op, "offsets", 1, dtypes=(torch.int32,), device=dev)
        check(offsets.shape[0] == b.shape[0] + 1, op, "offsets must have G+1 entries")
    M = out.shape[0] if out is not None else (pair_ids.shape[0] if grouped else a.shape[0])
    if out is None:
        out = torch.empty(M, n_out, device=dev, dtype=a.dtype)
    check(tuple(out.shape[1:]) == (n_out,), op, f"out must be [M, {n_out}]")
    cfg = dict(config or default_config(a.dtype))
    if M == 0 or n_out == 0:
        return out
    bs = b.stride() if grouped else (0,) + tuple(b.stride())
    groups = b.shape[0] if grouped else 0
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) + groups, triton.cdiv(n_out, cfg["BLOCK_N"]))
    _grouped_gemm_kernel[grid](
        a, b, out, pair_ids, scale, offsets, M, n_out, K,
        a.stride(0), a.stride(1), bs[0], bs[1], bs[2], out.stride(0), out.stride(1),
        NUM_GROUPS=groups, GATHER_DIV=gather_div, SCATTER=scatter,
        HAS_SCALE=scale is not None, ACT=ACTIVATIONS[activation],
        DOT_FP32=dot_in_fp32(a.dtype), **cfg)
    return out


@torch.library.custom_op("moe_adapter::expert_up", mutates_args=())
def expert_up(u: torch.Tensor, w1: torch.Tensor, sorted_pair: torch.Tensor,
              expert_offsets: torch.Tensor, top_k: int, activation: str) -> torch.Tensor:
    """Routed up-projection. u [T, d] (gathered by token = pair // k inside the GEMM), w1
    [E, d, F'] -> h [T*k, F] in expert-sorted order, activation (``silu``, ``swiglu``, or
    ``none``) applied in the epilogue."""
    return grouped_gemm(u, w1, offsets=expert_offsets, pair_ids=sorted_pair, gather_div=top_k,
                        activation=activation)


@expert_up.register_fake
def _(u, w1, sorted_pair, expert_offsets, top_k, activation):
    n = w1.shape[-1] // 2 if activation == "swiglu" else w1.shape[-1]
    return u.new_empty(sorted_pair.shape[0], n)


@torch.library.custom_op("moe_adapter::expert_down", mutates_args=())
def expert_down(h: torch.Tensor, w2: torch.Tensor, sorted_pair: torch.Tensor,
                expert_offsets: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Routed down-projection. h [T*k, F] (sorted), w2 [E, F, N] -> y_pairs [T*k, N] in pair
    order (row t*k+j), each row already multiplied by its gate weight topk_weights[t, j]."""
    return grouped_gemm(h, w2, offsets=expert_offsets, pair_ids=sorted_pair, scatter=True,
                        scale=topk_weights.reshape(-1))


@expert_down.register_fake
def _(h, w2, sorted_pair, expert_offsets, topk_weights):
    return h.new_empty(h.shape[0], w2.shape[-1])


@torch.library.custom_op("moe_adapter::linear", mutates_args=())
def linear(a: torch.Tensor, w: torch.Tensor, activation: str) -> torch.Tensor:
    """Dense a [M, K] @ w [K, N] with the activation fused (the shared / aggregation MLP)."""
    return grouped_gemm(a, w, activation=activation)


@linear.register_fake
def _(a, w, activation):
    n = w.shape[-1] // 2 if activation == "swiglu" else w.shape[-1]
    return a.new_empty(a.shape[0], n)
