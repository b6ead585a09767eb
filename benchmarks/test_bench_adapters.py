"""pytest-benchmark suite (``pytest benchmarks/``): dense vs MoE adapters and the main kernels.

On a GPU: bf16 at the paper's sizes, each call synchronised. Without one: a small fp32 torch
backend run, so the suite still runs (timings for orientation only)."""

import pytest
import torch

from moe_adapter_kernels import DenseAdapter, DenseAdapterConfig, MoEAdapter, MoEAdapterConfig
from moe_adapter_kernels.backends import available_backends

GPU = torch.cuda.is_available()
DEVICE, DTYPE = ("cuda", torch.bfloat16) if GPU else ("cpu", torch.float32)
TOKENS = 8192 if GPU else 64
BACKENDS = [b for b in available_backends() if GPU or b == "torch"]


def synced(fn):
    def run():
        out = fn()
        if GPU:
            torch.cuda.synchronize()
        return out
    return run


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(0)
    return torch.randn(TOKENS, 2560, device=DEVICE, dtype=DTYPE)


def test_dense_forward(benchmark, x):
    model = DenseAdapter(DenseAdapterConfig.paper()).to(DEVICE, DTYPE)
    with torch.no_grad():
        benchmark(synced(lambda: model(x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_forward(benchmark, x, backend):
    model = MoEAdapter(MoEAdapterConfig.paper(), backend=backend).to(DEVICE, DTYPE)
    with torch.no_grad():
        benchmark(synced(lambda: model(x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_forward_backward(benchmark, x, backend):
    model = MoEAdapter(MoEAdapterConfig.paper(), backend=backend).to(DEVICE, DTYPE)

    def step():
        model.zero_grad(set_to_none=True)
        (model(x).float().square().mean() + model.aux_loss).backward()
    benchmark(synced(step))


@pytest.mark.skipif(not GPU, reason="kernel timings need a CUDA GPU")
@pytest.mark.parametrize("step_name", ["route", "permute", "expert_up", "expert_down",
                                       "combine", "bwd dW1"])
def test_kernel(benchmark, x, step_name):
    from benchmarks.kernels import steps
    model = MoEAdapter(MoEAdapterConfig.paper(), backend="triton").to(DEVICE, DTYPE)
    with torch.no_grad():
        fn = {name: f for name, f, _, _ in steps(model, x)}[step_name]
        benchmark(synced(fn))
