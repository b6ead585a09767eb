"""Weight gradients of grouped (per-expert) and dense GEMMs: dW[g] = A[rows_g]^T @ B[rows_g],
reduced over each group's variable-length row range by one program per output tile (a fixed
order: deterministic, no atomics). A group with no rows gets an exact-zero gradient.

Whatever is computed on the fly (the activation recomputed from the saved pre-activation, the
gate scale) is applied to the A tile only, so the B tile goes from memory to the tensor cores
untouched and the compiler can pipeline its loads."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check, custom_op, dot_in_fp32
from . import tuning
from .grouped_gemm import ACTIVATIONS, _act, _pair_ids, _source_rows, pick_config


@triton.jit
def _weight_grad_kernel(
        A, B, DW, DB, PairIds, Scale, Offsets, M, KA, NB,
        stride_am, stride_ak, stride_bm, stride_bn, stride_wg, stride_wk, stride_wn, stride_dbg,
        NUM_GROUPS: tl.constexpr, A_GATHER_DIV: tl.constexpr, B_GATHER_DIV: tl.constexpr,
        HAS_SCALE: tl.constexpr, A_ACT: tl.constexpr, HAS_DB: tl.constexpr,
        DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of dW[g] (rows over KA, columns over NB), reduced over the
    group's rows BLOCK_K at a time."""
    g = tl.program_id(0)
    pid = tl.program_id(1)
    n_tiles = tl.cdiv(NB, BLOCK_N)
    rk = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = rk < KA
    n_ok = rn < NB
    if NUM_GROUPS == 0:
        lo = 0
        hi = M
    else:
        lo = tl.load(Offsets + g)
        hi = tl.load(Offsets + g + 1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    bsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_ok = rows < hi
        pair = _pair_ids(PairIds, rows, r_ok, A_GATHER_DIV > 0 or B_GATHER_DIV > 0 or HAS_SCALE)
        a_row = _source_rows(pair, rows, A_GATHER_DIV)
        b_row = _source_rows(pair, rows, B_GATHER_DIV)
        a_ptr = A + a_row[None, :] * stride_am + rk[:, None] * stride_ak
        a_mask = k_ok[:, None] & r_ok[None, :]
        a = tl.load(a_ptr, mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K] = A^T tile
        if A_ACT == 2:  # A holds SwiGLU [gate | up]: use silu(gate) * up
            af = a.to(tl.float32)
            up = tl.load(a_ptr + KA * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
            af = af * tl.sigmoid(af) * up
        elif A_ACT != 0:
            af = _act(a.to(tl.float32), A_ACT)
        elif HAS_SCALE:
            af = a.to(tl.float32)
        if HAS_SCALE:  # (scale * B)^T A = (A * scale)^T B: scale the rows of A instead
            s = tl.load(Scale + pair, mask=r_ok, other=0.0).to(tl.float32)
            af = af * s[None, :]
        if A_ACT != 0 or HAS_SCALE:
            a = af.to(a.dtype)
        b = tl.load(B + b_row[:, None] * stride_bm + rn[None, :] * stride_bn,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_DB:  # column sums of scale * B
            bf = b.to(tl.float32)
            if HAS_SCALE:
                bf = bf * s[:, None]
            bsum += tl.sum(bf, 0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    w_ptr = DW + g.to(tl.int64) * stride_wg + rk[:, None] * stride_wk + rn[None, :] * stride_wn
    tl.store(w_ptr, acc.to(DW.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])
    if HAS_DB:  # the bias gradient: column sums of (scaled) B, from the first K tile only
        tl.store(DB + g.to(tl.int64) * stride_dbg + rn, bsum.to(DB.dtype.element_ty),
                 mask=n_ok & ((pid // n_tiles + rn * 0) == 0))


def wgrad_key(a, b, *, offsets=None, pair_ids=None, scale=None, a_activation="none",
              **_) -> str:
    """The tuning key of a :func:`weight_grad` launch (see ``tuning.shape_key``)."""
    grouped = offsets is not None
    rows = pair_ids.shape[0] if pair_ids is not None else a.shape[0]
    ka = a.shape[1] // 2 if a_activation == "swiglu" else a.shape[1]
    variant = (f"{'grouped' if grouped else 'dense'}-{a_activation}"
               f"{'-scaled' if scale is not None else ''}")
    return tuning.shape_key("wgrad", variant, a.dtype, rows, b.shape[1], ka)


def weight_grad(a: torch.Tensor, b: torch.Tensor, *, offsets: torch.Tensor | None = None,
                pair_ids: torch.Tensor | None = None, a_gather_div: int = 0,
                b_gather_div: int = 0, scale: torch.Tensor | None = None,
                a_activation: str = "none", bias_grad: bool = False,
                config: dict | None = None):
    """dW = act(A)^T @ (scale * B), per group of sorted rows (``offsets`` [G+1]) or over all
    rows (dense). Rows are sorted positions; A/B rows may be gathered by pair // div.

    a: [Ma, KA] (``swiglu``: [Ma, 2 KA], the saved [gate | up] pre-activation);
    b: [Mb, NB]; scale [P] by pair. Returns dW [G, KA, NB] (grouped) or [KA, NB] (dense), and
    with ``bias_grad`` also (dW, dbias) where dbias [G, NB] / [NB] sums the rows of scale * B.
    ``config``: tile shape (BLOCK_M over KA, BLOCK_N over NB, BLOCK_K over rows, num_warps,
    num_stages); default the tuned one for this device and shape (see ``tuning``).
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
    cfg = dict(config or pick_config(wgrad_key(a, b, offsets=offsets, pair_ids=pair_ids,
                                               scale=scale, a_activation=a_activation), a))
    if dw.numel():
        wst = dw.stride() if groups else (0,) + tuple(dw.stride())
        grid = (max(groups, 1), cdiv(KA, cfg["BLOCK_M"]) * cdiv(NB, cfg["BLOCK_N"]))
        _weight_grad_kernel[grid](
            a, b, dw, db, pair_ids, scale, offsets, M, KA, NB,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), wst[0], wst[1], wst[2],
            db.stride(0) if bias_grad and groups else 0,
            NUM_GROUPS=groups, A_GATHER_DIV=a_gather_div, B_GATHER_DIV=b_gather_div,
            HAS_SCALE=scale is not None, A_ACT=ACTIVATIONS[a_activation], HAS_DB=bias_grad,
            DOT_FP32=dot_in_fp32(a.dtype), **cfg)
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
