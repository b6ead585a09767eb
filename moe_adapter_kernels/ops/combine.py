"""Combine: y[t] = N(sum_j Yp[t*k + j] (+ S[t])), the k slot outputs of each token summed in a
fixed order in fp32 (no atomics: deterministic), the shared expert added and the norm fused."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, check_tensor, custom_op, pow2
from .norm import NORM_CODES, _norm_row


@triton.jit
def _combine_kernel(Yp, S, Y, Z, W, B, Mean, Rstd, N, eps, stride_p, stride_s, stride_y,
                    stride_z, K: tl.constexpr, HAS_SHARED: tl.constexpr, NORM: tl.constexpr,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SAVE_SUM: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(Yp + (t * K + j) * stride_p + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(S + t * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
    if SAVE_SUM:  # the norm's input, for the backward
        tl.store(Z + t * stride_z + cols, acc.to(Z.dtype.element_ty), mask=mask)
    if NORM >= 0:
        acc, mean, rstd = _norm_row(acc, cols, N, W, B, eps, NORM == 1, HAS_W, HAS_B)
        tl.store(Mean + t, mean)
        tl.store(Rstd + t, rstd)
    tl.store(Y + t * stride_y + cols, acc.to(Y.dtype.element_ty), mask=mask)


def combine_forward(y_pairs: torch.Tensor, top_k: int, shared: torch.Tensor | None,
                    norm: str, weight, bias, eps: float, save_sum: bool = False):
    """y_pairs [T*k, N] (gate-weighted expert outputs in pair order), shared [T, N] or None.

    Returns (y [T, N] in y_pairs.dtype, mean [T], rstd [T], z); the statistics are those of
    the norm (``layernorm``, ``rmsnorm``) and unset for ``none``; z is the pre-norm sum [T, N]
    when ``save_sum`` (kept for the backward), else an empty tensor.
    """
    check_tensor(y_pairs, "combine", "y_pairs", 2)
    P, N = y_pairs.shape
    check(P % top_k == 0, "combine", "y_pairs has {} rows, not a multiple of k={}", P, top_k)
    T = P // top_k
    if shared is not None:
        check_tensor(shared, "combine", "shared", 2, device=y_pairs.device)
        check(tuple(shared.shape) == (T, N), "combine", "shared must be [{}, {}]", T, N)
    check(norm in NORM_CODES or norm == "none", "combine", "unknown norm {!r}", norm)
    dev = y_pairs.device
    y = torch.empty(T, N, device=dev, dtype=y_pairs.dtype)
    mean = torch.empty(T, device=dev, dtype=torch.float32)
    rstd = torch.empty(T, device=dev, dtype=torch.float32)
    z = torch.empty(T if save_sum else 0, N, device=dev, dtype=y_pairs.dtype)
    if T:
        _combine_kernel[(T,)](y_pairs, shared, y, z, weight, bias, mean, rstd, N, eps,
                              y_pairs.stride(0), 0 if shared is None else shared.stride(0),
                              y.stride(0), z.stride(0), K=top_k, HAS_SHARED=shared is not None,
                              NORM=NORM_CODES.get(norm, -1), HAS_W=weight is not None,
                              HAS_B=bias is not None, SAVE_SUM=save_sum, BLOCK_N=pow2(N),
                              num_warps=4 if N <= 4096 else 8)
    return y, mean, rstd, z


@custom_op("moe_adapter::combine")
def combine(y_pairs: torch.Tensor, shared: torch.Tensor | None, top_k: int, norm: str,
            weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
            save_sum: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch op of :func:`combine_forward`: (y [T, N], mean [T], rstd [T], z)."""
    return combine_forward(y_pairs, top_k, shared, norm, weight, bias, eps, save_sum)


@combine.register_fake
def _(y_pairs, shared, top_k, norm, weight, bias, eps, save_sum=False):
    T, N = y_pairs.shape[0] // top_k, y_pairs.shape[1]
    return (y_pairs.new_empty(T, N), y_pairs.new_empty(T, dtype=torch.float32),
            y_pairs.new_empty(T, dtype=torch.float32), y_pairs.new_empty(T if save_sum else 0, N))
