"""h = g * act(pre) in one pass: the routed experts' hidden recomputed from the saved
pre-activation, each sorted row scaled by its pair's gate. It is the A operand of the routed
dW2 = (g h)^T dz; as torch ops (activation, gather of the gates, in-place scale) it took two
passes over [T*k, F] and a launch per step."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check, check_tensor, custom_op
from .grouped_gemm import ACTIVATIONS, _act


@triton.jit
def _scaled_act_kernel(Pre, Out, Gates, Pair, M, F, stride_p, stride_o, ACT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    r_ok = rows < M
    mask = r_ok[:, None] & (cols[None, :] < F)
    rows64 = rows.to(tl.int64)
    ptr = Pre + rows64[:, None] * stride_p + cols[None, :]
    z = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    if ACT == 2:  # SwiGLU: pre holds [gate | up]
        h = z * tl.sigmoid(z) * tl.load(ptr + F, mask=mask, other=0.0).to(tl.float32)
    else:
        h = _act(z, ACT)
    pair = tl.load(Pair + rows, mask=r_ok, other=0)
    h = h * tl.load(Gates + pair, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(Out + rows64[:, None] * stride_o + cols[None, :], h.to(Out.dtype.element_ty),
             mask=mask)


def scaled_activation_forward(pre: torch.Tensor, activation: str, gates: torch.Tensor,
                              sorted_pair: torch.Tensor) -> torch.Tensor:
    """gates[sorted_pair[r]] * act(pre[r]) for each sorted row r of pre [P, F'] (``swiglu``:
    F' = 2F, [gate | up]); gates [T, k] fp32 (flattened by pair id). Returns [P, F] in
    pre.dtype, computed in fp32 and rounded once."""
    op = "scaled_activation"
    check_tensor(pre, op, "pre", 2)
    check(activation in ACTIVATIONS, op, "activation must be one of {}", list(ACTIVATIONS))
    check_tensor(gates, op, "gates", 2, dtypes=(torch.float32,), device=pre.device)
    check(sorted_pair.dim() == 1 and sorted_pair.shape[0] == pre.shape[0]
          and sorted_pair.dtype == torch.int32, op,
          "sorted_pair must be int32 [{}], got {} {}", pre.shape[0], sorted_pair.dtype,
          tuple(sorted_pair.shape))
    M = pre.shape[0]
    F = pre.shape[1] // 2 if activation == "swiglu" else pre.shape[1]
    out = torch.empty(M, F, device=pre.device, dtype=pre.dtype)
    if out.numel():
        BLOCK_M, BLOCK_F = 32, 128
        _scaled_act_kernel[(cdiv(M, BLOCK_M), cdiv(F, BLOCK_F))](
            pre, out, gates.contiguous(), sorted_pair, M, F, pre.stride(0), out.stride(0),
            ACT=ACTIVATIONS[activation], BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, num_warps=4)
    return out


@custom_op("moe_adapter::scaled_activation")
def scaled_activation(pre: torch.Tensor, activation: str, gates: torch.Tensor,
                      sorted_pair: torch.Tensor) -> torch.Tensor:
    """Torch op of :func:`scaled_activation_forward`: g * act(pre) [P, F]."""
    return scaled_activation_forward(pre, activation, gates, sorted_pair)


@scaled_activation.register_fake
def _(pre, activation, gates, sorted_pair):
    F = pre.shape[1] // 2 if activation == "swiglu" else pre.shape[1]
    return pre.new_empty(pre.shape[0], F)
