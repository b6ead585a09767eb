"""Helpers shared by the Triton launchers: argument checks and interpreter quirks."""

from __future__ import annotations

import os

import torch

from ..backends import FUSED_DTYPES


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


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python (``triton.cdiv`` is a constexpr function: ~3 us a call from
    the host, on every launch)."""
    return -(-a // b)


def pow2(n: int, lo: int = 1) -> int:
    """The smallest power of two >= max(n, lo)."""
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def check(cond: bool, op: str, msg: str, *args, exc=ValueError) -> None:
    """Raise ``exc`` naming ``op`` unless ``cond``. ``msg`` is a ``str.format`` template
    filled with ``args`` only on failure: the checks run on every launch, and formatting
    shapes and dtypes costs microseconds of host time that small batches feel."""
    if not cond:
        raise exc(f"moe_adapter_kernels.ops.{op}: {msg.format(*args)}")


def check_tensor(t: torch.Tensor, op: str, name: str, dim: int, dtypes=FUSED_DTYPES,
                 device: torch.device | None = None) -> None:
    """Raise TypeError/ValueError unless t is a tensor of ``dim`` dims, an allowed dtype, on
    ``device``, with a unit stride in its last dim."""
    if (isinstance(t, torch.Tensor) and t.dim() == dim and t.dtype in dtypes
            and (device is None or t.device == device) and (t.stride(-1) == 1 or not t.numel())):
        return  # one expression on the common path: these checks run on every launch
    check(isinstance(t, torch.Tensor), op, "{} must be a tensor", name, exc=TypeError)
    check(t.dim() == dim, op, "{} must have {} dims, got shape {}", name, dim, tuple(t.shape))
    check(t.dtype in dtypes, op, "{} has dtype {}; expected one of {}", name, t.dtype, dtypes,
          exc=TypeError)
    check(device is None or t.device == device, op, "{} is on {}, expected {}", name, t.device,
          device)
    check(t.numel() == 0 or t.stride(-1) == 1, op, "{} must be contiguous in its last dim", name)
