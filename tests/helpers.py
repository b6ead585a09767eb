"""Shared test utilities: relative error, small configs, routing control, program order."""

import contextlib
import math
import os
import re
from pathlib import Path

import torch

from moe_adapter_kernels import MoEAdapterConfig
from moe_adapter_kernels.check import rel_err  # noqa: F401  (re-exported for the tests)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]


def checkout_env(*drop: str, **overrides: str) -> dict:
    """This process's environment without the variables ``drop``, with ``overrides``, and with
    this checkout first on PYTHONPATH, so a subprocess imports it even without an install."""
    env = {k: v for k, v in os.environ.items() if k not in drop} | overrides
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def readme_python_blocks() -> list[str]:
    """The code of every ```python block in the README, in order."""
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def compiler_env() -> dict:
    """The environment of a subprocess that needs Triton's real compiler (not the interpreter)
    and imports this checkout even without an install."""
    env = checkout_env("TRITON_INTERPRET")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# Config variants every backend is checked on (small_config overrides): topologies,
# activations, norms, biases, k = 1 and k = E.
VARIANTS = {
    "paper-shape": dict(),
    "swiglu-rms": dict(expert_activation="swiglu", norm="rmsnorm"),
    "post-swiglu": dict(topology="post", expert_activation="swiglu"),
    "post-none": dict(topology="post", norm="none"),
    "k1": dict(top_k=1),
    "k=E": dict(num_experts=4, top_k=4),
    "bias-gelu": dict(bias=True, expert_activation="gelu", shared_activation="gelu"),
    "identity-no-in-norm": dict(expert_activation="identity", shared_activation="identity",
                                input_norm=False, bias=True),
}


def require_fused(name: str) -> None:
    """Skip when Triton does not import; for the CUDA extension, skip only where it is not
    meant to run (no GPU and no emulator) and fail where its build fails, so a broken build
    cannot hide behind a skip."""
    import pytest

    if name == "triton":
        pytest.importorskip("triton")
        return
    from moe_adapter_kernels import cuda
    if not cuda.emulating() and not torch.cuda.is_available():
        pytest.skip("the cuda backend needs a GPU or MOE_ADAPTER_CUDA_EMULATE=1")
    ok, why = cuda.status()
    assert ok, why


def between_bands(shape, dtype, value, guard, device=DEVICE, empty=torch.empty):
    """(tensor, buffer): a contiguous tensor of ``shape`` inside a 1-D buffer that holds
    ``guard`` elements of ``value`` on either side (the tensor starts as ``value`` too), so a
    kernel reading or writing past either end of it shows. ``empty`` allocates the buffer
    (the poison fixture passes the unpatched torch.empty)."""
    n = math.prod(shape)
    buf = empty(n + 2 * guard, dtype=dtype, device=device).fill_(value)
    return buf[guard:guard + n].view(shape), buf


def small_config(**kw) -> MoEAdapterConfig:
    """A small config with odd sizes (partial tiles everywhere)."""
    base = dict(d_in=72, d_out=40, num_experts=8, top_k=4, expert_dim=24, shared_dim=56)
    base.update(kw)
    return MoEAdapterConfig(**base)


def force_routing(model, live: list[int]) -> None:
    """Make the router pick only experts in ``live`` (LayerNorm input norm required).

    With norm_in.bias = 1, u = normalised(x) + 1, so a gate column c*1 + noise gives logits
    near c * d_in: live experts get c = 1, the others c = -1.
    """
    assert model.config.norm == "layernorm"
    with torch.no_grad():
        model.norm_in.bias.fill_(1.0)
        w = torch.full_like(model.w_gate, -1.0)
        for e in live:
            w[:, e] = 1.0 + 0.05 * torch.randn_like(w[:, e])
        model.w_gate.copy_(w)


@contextlib.contextmanager
def programs_in_reverse(backend: str):
    """Run every launch's programs (Triton) or blocks and their threads (CUDA emulator) in
    reverse order inside the block. CPU only: the interpreter and the emulator run them one by
    one, in order, by default."""
    if backend == "cuda":
        from moe_adapter_kernels import cuda
        ext = cuda.load()
        ext.set_reverse(True)
        try:
            yield
        finally:
            ext.set_reverse(False)
        return
    from triton.runtime.interpreter import InterpreterBuilder  # the interpreter's grid walk
    set_idx = InterpreterBuilder.set_grid_idx

    def reverse(self, x, y, z):
        nx, ny, nz = self.grid_dim
        set_idx(self, nx - 1 - x, ny - 1 - y, nz - 1 - z)

    InterpreterBuilder.set_grid_idx = reverse
    try:
        yield
    finally:
        InterpreterBuilder.set_grid_idx = set_idx
