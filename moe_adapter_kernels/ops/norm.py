"""Row-wise LayerNorm / RMSNorm: statistics in fp32, one program per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check, check_tensor, custom_op, interpreting, pow2

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
    check(kind in NORM_CODES, "norm", "kind must be layernorm or rmsnorm, got {!r}", kind)
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


@triton.jit
def _norm_bwd_rows(dy, x, mean, rstd, w, mask, N, IS_RMS: tl.constexpr, HAS_W: tl.constexpr):
    """(dx, xhat) of rows [R, BLOCK_N] of y = N(x) given fp32 dy, x (masked to N columns) and
    the rows' mean and rstd [R]; xhat (0 where masked) is what the weight gradient sums."""
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    if HAS_W:
        wdy = dy * w[None, :]
    else:
        wdy = dy
    c1 = tl.sum(xhat * wdy, 1) / N
    if IS_RMS:
        dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
    else:
        dx = (wdy - xhat * c1[:, None] - (tl.sum(wdy, 1) / N)[:, None]) * rstd[:, None]
    return dx, xhat


@triton.jit
def _norm_bwd_kernel(DY, X, W, Mean, Rstd, DX, DWp, DBp, T, N, stride_dy, stride_x, stride_dx,
                     ROWS: tl.constexpr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx for ROWS rows, BLOCK_R at a time, plus this program's partial sums of dw (dy * xhat)
    and db (dy)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = None
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, ROWS, BLOCK_R):
        rows = pid * ROWS + r0 + tl.arange(0, BLOCK_R)
        r_ok = rows < T
        rows64 = rows.to(tl.int64)
        mask = r_ok[:, None] & cmask[None, :]
        x = tl.load(X + (rows64 * stride_x)[:, None] + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        dy = tl.load(DY + (rows64 * stride_dy)[:, None] + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=r_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=r_ok, other=0.0)
        dx, xhat = _norm_bwd_rows(dy, x, mean, rstd, w, mask, N, IS_RMS, HAS_W)
        tl.store(DX + (rows64 * stride_dx)[:, None] + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
        dw += tl.sum(dy * xhat, 0)
        db += tl.sum(dy, 0)
    if HAS_W:
        tl.store(DWp + pid.to(tl.int64) * N + cols, dw, mask=cmask)
    if HAS_B:
        tl.store(DBp + pid.to(tl.int64) * N + cols, db, mask=cmask)


NORM_BWD_ROWS = 16  # rows per program of the norm backward kernels (here and input_grad)


def rows_per_step() -> int:
    """Rows a norm-backward program handles at once: one on a GPU (a row of N fp32 values in
    registers), all NORM_BWD_ROWS under the interpreter (fewer, larger numpy steps: the same
    arithmetic, much less CPU time in CI)."""
    return NORM_BWD_ROWS if interpreting() else 1


def norm_backward(dy: torch.Tensor, x: torch.Tensor, kind: str, weight, bias, mean, rstd,
                  dx_dtype: torch.dtype | None = None):
    """Gradients of y = N(x): (dx [T, N], dweight [N] or None, dbias [N] or None).

    x is the saved norm input, mean/rstd the forward's statistics. Weight and bias gradients
    are per-program partial sums reduced in a fixed order (deterministic).
    """
    check_tensor(dy, "norm_backward", "dy", 2)
    check_tensor(x, "norm_backward", "x", 2, device=dy.device)
    check(dy.shape == x.shape, "norm_backward", "dy {} != x {}", tuple(dy.shape), tuple(x.shape))
    T, N = x.shape
    dx = torch.empty(T, N, device=x.device, dtype=dx_dtype or x.dtype)
    nprog = cdiv(T, NORM_BWD_ROWS)
    dwp = torch.empty(nprog, N, device=x.device, dtype=torch.float32)
    dbp = torch.empty(nprog, N, device=x.device, dtype=torch.float32)
    if T:
        _norm_bwd_kernel[(nprog,)](dy, x, weight, mean, rstd, dx, dwp, dbp, T, N,
                                   dy.stride(0), x.stride(0), dx.stride(0), ROWS=NORM_BWD_ROWS,
                                   IS_RMS=kind == "rmsnorm", HAS_W=weight is not None,
                                   HAS_B=bias is not None, BLOCK_R=rows_per_step(),
                                   BLOCK_N=pow2(N), num_warps=4 if N <= 4096 else 8)
    dweight = None if weight is None else dwp.sum(0).to(weight.dtype)
    dbias = None if bias is None else dbp.sum(0).to(bias.dtype)
    return dx, dweight, dbias


@custom_op("moe_adapter::norm")
def norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, kind: str,
         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch op of :func:`norm_forward`: (y [T, N], mean [T] fp32, rstd [T] fp32)."""
    return norm_forward(x, kind, weight, bias, eps)


@norm.register_fake
def _(x, weight, bias, kind, eps):
    T = x.shape[0]
    return (torch.empty_like(x), x.new_empty(T, dtype=torch.float32),
            x.new_empty(T, dtype=torch.float32))


@custom_op("moe_adapter::norm_backward")
def norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
             bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, kind: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch op of :func:`norm_backward`: (dx, dweight, dbias); a missing parameter's
    gradient is an empty tensor."""
    dx, dw, db = norm_backward(dy, x, kind, weight, bias, mean, rstd)
    empty = x.new_empty(0)
    return dx, empty if dw is None else dw, empty if db is None else db


@norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, kind):
    return (torch.empty_like(x), x.new_empty(0) if weight is None else torch.empty_like(weight),
            x.new_empty(0) if bias is None else torch.empty_like(bias))
