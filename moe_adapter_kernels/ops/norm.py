"""Row-wise LayerNorm / RMSNorm: statistics in fp32, one program per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, check_tensor, pow2

NORM_CODES = {"layernorm": 0, "rmsnorm": 1}


@triton.jit
def _norm_row(x, cols, N, W, B, eps, IS_RMS: tl.constexpr, HAS_W: tl.constexpr,
              HAS_B: tl.constexpr):
    """Normalise one fp32 row ``x`` (masked to N columns); returns (y, mean, rstd)."""
    mask = cols < N
    if IS_RMS:
        mean = 0.0
        xc = x
    else:
        mean = tl.sum(x, 0) / N
        xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / N + eps)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return y, mean, rstd


@triton.jit
def _norm_fwd_kernel(X, Y, W, B, Mean, Rstd, N, stride_x, stride_y, eps,
                     IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    x = tl.load(X + row * stride_x + cols, mask=cols < N, other=0.0).to(tl.float32)
    y, mean, rstd = _norm_row(x, cols, N, W, B, eps, IS_RMS, HAS_W, HAS_B)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=cols < N)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


def norm_forward(x: torch.Tensor, kind: str, weight, bias, eps: float):
    """N(x) over the last dim of x [T, N]. Returns (y [T, N] in x.dtype, mean [T] fp32,
    rstd [T] fp32); mean is 0 for RMSNorm. ``kind`` is ``layernorm`` or ``rmsnorm``."""
    check_tensor(x, "norm", "x", 2)
    check(kind in NORM_CODES, "norm", f"kind must be layernorm or rmsnorm, got {kind!r}")
    T, N = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(T, device=x.device, dtype=torch.float32)
    rstd = torch.empty(T, device=x.device, dtype=torch.float32)
    if T:
        _norm_fwd_kernel[(T,)](x, y, weight, bias, mean, rstd, N, x.stride(0), y.stride(0),
                               eps, IS_RMS=kind == "rmsnorm", HAS_W=weight is not None,
                               HAS_B=bias is not None, BLOCK_N=pow2(N),
                               num_warps=4 if N <= 4096 else 8)
    return y, mean, rstd


@torch.library.custom_op("moe_adapter::norm", mutates_args=())
def norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, kind: str,
         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch op of :func:`norm_forward`: (y [T, N], mean [T] fp32, rstd [T] fp32)."""
    return norm_forward(x, kind, weight, bias, eps)


@norm.register_fake
def _(x, weight, bias, kind, eps):
    T = x.shape[0]
    return (torch.empty_like(x), x.new_empty(T, dtype=torch.float32),
            x.new_empty(T, dtype=torch.float32))
