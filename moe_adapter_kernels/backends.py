"""Which implementations of the adapter exist on this machine, and which one ``auto`` picks."""

from __future__ import annotations

import functools
import logging
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
log = logging.getLogger("moe_adapter_kernels")


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(usable, reason). Triton runs on CUDA GPUs, or on the CPU under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton does not import ({exc})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def cuda_ext_status() -> tuple[bool, str]:
    """(usable, reason) for the compiled CUDA extension in csrc/ (see ``moe_adapter_kernels.cuda``;
    the first call may build it)."""
    from . import cuda
    return cuda.status()


def status(name: str) -> tuple[bool, str]:
    if name == "torch":
        return True, f"pure PyTorch {torch.__version__}"
    if name == "triton":
        return triton_status()
    if name == "cuda":
        return cuda_ext_status()
    raise ValueError(f"backend: unknown name {name!r}; expected one of {', '.join(BACKENDS)}")


def available_backends() -> list[str]:
    """Concrete backends usable here, best first."""
    return [b for b in BACKENDS[1:] if status(b)[0]]


def check_backend(name: str) -> str:
    """Validate a requested backend name; raise if it is unknown or unusable here."""
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown name {name!r}; expected one of {', '.join(BACKENDS)}")
    if name != "auto":
        ok, why = status(name)
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available: {why}")
    return name


# What the fused kernels compute in (their launchers check it); ``auto`` runs anything else
# (float64) on torch.
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve(name: str, device: torch.device, implemented: tuple[str, ...],
            fused_ok: bool = True) -> str:
    """The backend to run for tensors on ``device``: ``auto`` prefers triton, then cuda, on
    CUDA devices and uses torch elsewhere, or where the caller says the fused kernels cannot
    run this case (``fused_ok`` False: a float64 input or router)."""
    if name != "auto":
        return name
    if device.type == "cuda" and fused_ok:
        for b in ("triton", "cuda"):
            if b in implemented and status(b)[0]:
                return b
            if b in implemented and not torch.compiler.is_compiling():
                _log_fallback(b)
    return "torch"


@functools.lru_cache(maxsize=None)
def _log_fallback(name: str) -> None:
    log.debug("backend 'auto': %s is unavailable (%s)", name, status(name)[1])
