"""Helpers shared by the Triton launchers: argument checks and interpreter quirks."""

from __future__ import annotations

import os

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def custom_op(name: str):
    """``torch.library.custom_op(name, mutates_args=())`` that also keeps the undecorated
    function as ``.eager``: the autograd wiring calls that outside torch.compile (same code,
    without the dispatcher's per-call host cost, which matters when T is small) and the
    registered op when compiling."""
    def wrap(fn):
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.eager = fn
        return op
    return wrap


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on the CPU through numpy)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Cast tl.dot operands to fp32? The interpreter's bf16 tl.dot is wrong (triton 3.9), fp32
    casts are exact there; fp32 inputs always take the exact (non-tf32) path."""
    return dtype == torch.float32 or (interpreting() and dtype == torch.bfloat16)


def pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))


def check(cond: bool, op: str, msg: str, exc=ValueError) -> None:
    if not cond:
        raise exc(f"moe_adapter_kernels.ops.{op}: {msg}")


def check_tensor(t: torch.Tensor, op: str, name: str, dim: int, dtypes=FLOAT_DTYPES,
                 device: torch.device | None = None) -> None:
    """Raise TypeError/ValueError unless t is a tensor of ``dim`` dims, an allowed dtype, on
    ``device``, with a unit stride in its last dim."""
    check(isinstance(t, torch.Tensor), op, f"{name} must be a tensor", TypeError)
    check(t.dim() == dim, op, f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:  # message built only on failure: this runs on every launch
        check(False, op, f"{name} has dtype {t.dtype}; expected one of "
              f"{', '.join(str(d) for d in dtypes)}", TypeError)
    if device is not None:
        check(t.device == device, op, f"{name} is on {t.device}, expected {device}")
    check(t.numel() == 0 or t.stride(-1) == 1, op, f"{name} must be contiguous in its last dim")
