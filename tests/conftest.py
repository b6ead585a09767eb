import os

import pytest
import torch

if not torch.cuda.is_available():
    # Run the Triton kernels on the CPU through the interpreter (must precede any triton import)
    # and the CUDA C++ kernels through their CPU emulator.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("MOE_ADAPTER_CUDA_EMULATE", "1")

FUSED_BACKENDS = ("triton", "cuda")


@pytest.fixture(params=FUSED_BACKENDS)
def backend(request):
    """Each fused backend in turn (see helpers.require_fused for when one is skipped)."""
    from helpers import require_fused
    require_fused(request.param)
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


GUARD = 4096  # elements of poison before and after each tensor the poison fixture guards


@pytest.fixture
def poison(monkeypatch):
    """Make torch.empty / empty_like (and the CUDA extension's allocations, when it is loaded)
    return NaN (floats) or -7 (ints), so any output element a kernel forgets to write shows.
    Contiguous real (not fake) allocations also sit between GUARD elements of the same
    poison, checked after the test, so a kernel writing past either end of an output shows."""
    from helpers import between_bands
    from moe_adapter_kernels import cuda
    ext = None
    if cuda.emulating() or torch.cuda.is_available():
        try:
            ext = cuda.load()
        except RuntimeError:  # not buildable here: the backend fixture reports it
            pass
    if ext is not None:
        ext.set_poison(True)
    empty, empty_like = torch.empty, torch.empty_like
    guarded = []

    def value(t):
        return float("nan") if t.is_floating_point() else -7

    def guard(t):
        if type(t) is not torch.Tensor or t.is_meta or not t.numel() or not t.is_contiguous():
            return t.fill_(value(t)) if t.numel() else t
        view, buf = between_bands(t.shape, t.dtype, value(t), GUARD, t.device, empty)
        guarded.append(buf)
        return view

    monkeypatch.setattr(torch, "empty", lambda *a, **k: guard(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: guard(empty_like(*a, **k)))
    yield
    if ext is not None:
        ext.set_poison(False)
    for buf in guarded:
        bands = torch.cat([buf[:GUARD], buf[-GUARD:]])
        intact = (bands.isnan().all() if bands.is_floating_point() else
                  torch.equal(bands, torch.full_like(bands, value(bands))))
        assert intact, f"a kernel wrote past the end of a {buf.dtype} tensor"
