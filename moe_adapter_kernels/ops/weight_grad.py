"""Weight gradients of grouped (per-expert) and dense GEMMs: dW[g] = A[rows_g]^T @ B[rows_g],
reduced over each group's variable-length row range by one program per output tile (a fixed
order: deterministic, no atomics). A group with no rows gets an exact-zero gradient."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check, custom_op, dot_in_fp32, interpreting
from .grouped_gemm import ACTIVATIONS, _act, _pair_ids, _source_rows


@triton.jit
def _weight_grad_kernel(
        A, B, DW, DB, PairIds, Scale, Offsets, M, KA, NB,
        stride_am, stride_ak, stride_bm, stride_bn, stride_wg, stride_wk, stride_wn, stride_dbg,
        NUM_GROUPS: tl.constexpr, A_GATHER_DIV: tl.constexpr, B_GATHER_DIV: tl.constexpr,
        HAS_SCALE: tl.constexpr, A_ACT: tl.constexpr, HAS_DB: tl.constexpr,
        DOT_FP32: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    g = tl.program_id(0)
    pid = tl.program_id(1)
    n_tiles = tl.cdiv(NB, BLOCK_N)
    rk = (pid // n_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = rk < KA
    n_ok = rn < NB
    if NUM_GROUPS == 0:
        lo = 0
        hi = M
    else:
        lo = tl.load(Offsets + g)
        hi = tl.load(Offsets + g + 1)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    bsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_ok = rows < hi
        pair = _pair_ids(PairIds, rows, r_ok, A_GATHER_DIV > 0 or B_GATHER_DIV > 0 or HAS_SCALE)
        a_row = _source_rows(pair, rows, A_GATHER_DIV)
        b_row = _source_rows(pair, rows, B_GATHER_DIV)
        a_ptr = A + a_row[None, :] * stride_am + rk[:, None] * stride_ak
        a_mask = k_ok[:, None] & r_ok[None, :]
        a = tl.load(a_ptr, mask=a_mask, other=0.0)  # [BLOCK_K, BLOCK_R] = A^T tile
        if A_ACT == 2:  # A holds SwiGLU [gate | up]: use silu(gate) * up
            af = a.to(tl.float32)
            up = tl.load(a_ptr + KA * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
            a = (af * tl.sigmoid(af) * up).to(a.dtype)
        elif A_ACT != 0:
            a = _act(a.to(tl.float32), A_ACT).to(a.dtype)
        b = tl.load(B + b_row[:, None] * stride_bm + rn[None, :] * stride_bn,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_SCALE:
            s = tl.load(Scale + pair, mask=r_ok, other=0.0).to(tl.float32)
            b = (b.to(tl.float32) * s[:, None]).to(b.dtype)
        if HAS_DB:
            bsum += tl.sum(b.to(tl.float32), 0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    w_ptr = DW + g.to(tl.int64) * stride_wg + rk[:, None] * stride_wk + rn[None, :] * stride_wn
    tl.store(w_ptr, acc.to(DW.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])
    if HAS_DB:  # the bias gradient: column sums of (scaled) B, from the first K tile only
        tl.store(DB + g.to(tl.int64) * stride_dbg + rn, bsum.to(DB.dtype.element_ty),
                 mask=n_ok & ((pid // n_tiles + rn * 0) == 0))


def weight_grad(a: torch.Tensor, b: torch.Tensor, *, offsets: torch.Tensor | None = None,
                pair_ids: torch.Tensor | None = None, a_gather_div: int = 0,
                b_gather_div: int = 0, scale: torch.Tensor | None = None,
                a_activation: str = "none", bias_grad: bool = False):
    """dW = act(A)^T @ (scale * B), per group of sorted rows (``offsets`` [G+1]) or over all
    rows (dense). Rows are sorted positions; A/B rows may be gathered by pair // div.

    a: [Ma, KA] (``swiglu``: [Ma, 2 KA], the saved [gate | up] pre-activation);
    b: [Mb, NB]; scale [P] by pair. Returns dW [G, KA, NB] (grouped) or [KA, NB] (dense), and
    with ``bias_grad`` also (dW, dbias) where dbias [G, NB] / [NB] sums the rows of scale * B.
    """
    op = "weight_grad"
    check(a.dtype == b.dtype and a.device == b.device, op, "a and b must share dtype and device",
          exc=TypeError)
    check(a_activation in ACTIVATIONS, op, "a_activation must be one of {}", list(ACTIVATIONS))
    KA = a.shape[1] // 2 if a_activation == "swiglu" else a.shape[1]
    NB = b.shape[1]
    groups = 0 if offsets is None else offsets.shape[0] - 1
    M = pair_ids.shape[0] if pair_ids is not None else (a.shape[0] if a_gather_div == 0
                                                        else b.shape[0])
    shape = (groups, KA, NB) if groups else (KA, NB)
    dw = torch.empty(shape, device=a.device, dtype=a.dtype)
    db = torch.empty(shape[:-2] + (NB,), device=a.device, dtype=a.dtype) if bias_grad else None
    if dw.numel():
        # each program re-reads its rows of A once per N tile and of B once per K tile:
        # 128-wide tiles on the GPU halve that traffic against 64-wide ones
        bk, bn, br, warps = (32, 32, 32, 4) if interpreting() else (128, 128, 64, 8)
        wst = dw.stride() if groups else (0,) + tuple(dw.stride())
        grid = (max(groups, 1), cdiv(KA, bk) * cdiv(NB, bn))
        _weight_grad_kernel[grid](
            a, b, dw, db, pair_ids, scale, offsets, M, KA, NB,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), wst[0], wst[1], wst[2],
            db.stride(0) if bias_grad and groups else 0,
            NUM_GROUPS=groups, A_GATHER_DIV=a_gather_div, B_GATHER_DIV=b_gather_div,
            HAS_SCALE=scale is not None, A_ACT=ACTIVATIONS[a_activation], HAS_DB=bias_grad,
            DOT_FP32=dot_in_fp32(a.dtype), BLOCK_K=bk, BLOCK_N=bn, BLOCK_R=br,
            num_warps=warps, num_stages=1 if interpreting() else 3)
    return (dw, db) if bias_grad else dw


@custom_op("moe_adapter::weight_grad")
def weight_grad_op(a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor | None,
                   sorted_pair: torch.Tensor | None, a_gather_div: int, b_gather_div: int,
                   scale: torch.Tensor | None, a_activation: str, bias_grad: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch op of :func:`weight_grad` (grouped when expert_offsets is given, else dense):
    (dW, dbias), dbias empty unless ``bias_grad``."""
    out = weight_grad(a, b, offsets=expert_offsets, pair_ids=sorted_pair,
                      a_gather_div=a_gather_div, b_gather_div=b_gather_div, scale=scale,
                      a_activation=a_activation, bias_grad=bias_grad)
    return out if bias_grad else (out, a.new_empty(0))


@weight_grad_op.register_fake
def _(a, b, expert_offsets, sorted_pair, a_gather_div, b_gather_div, scale, a_activation,
      bias_grad=False):
    ka = a.shape[1] // 2 if a_activation == "swiglu" else a.shape[1]
    lead = () if expert_offsets is None else (expert_offsets.shape[0] - 1,)
    db = a.new_empty(*lead, b.shape[1]) if bias_grad else a.new_empty(0)
    return a.new_empty(*lead, ka, b.shape[1]), db
