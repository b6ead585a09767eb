"""MoEAdapter with each fused backend (``triton``, ``cuda``; the ``backend`` fixture) against
backend="torch" with identical weights (forward).

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 and the CUDA kernels under the
CPU emulator (MOE_ADAPTER_CUDA_EMULATE=1), fp32 and fp16, small odd shapes.
"""

import pytest
import torch

from moe_adapter_kernels import MoEAdapter

from helpers import (DEVICE, TOL, VARIANTS, force_routing, rel_err,
                     small_config)

CONFIGS = dict(VARIANTS, **{
    "no-shared": dict(shared_dim=0),
    "16c4-odd": dict(num_experts=16, d_in=75, d_out=33, expert_dim=21),
})


def pair(cfg, dtype, backend, seed=0):
    torch.manual_seed(seed)
    ref = MoEAdapter(cfg, backend="torch").to(DEVICE, dtype)
    fused = MoEAdapter(cfg, backend=backend).to(DEVICE, dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def compare(ref, fused, x, tol):
    with torch.no_grad():
        y_ref, y_fused = ref(x), fused(x)
    assert y_fused.shape == y_ref.shape and y_fused.dtype == y_ref.dtype
    assert fused.backend_used == fused.backend
    s_ref, s_fused = ref.routing_stats(), fused.routing_stats()
    assert torch.equal(s_ref.tokens_per_expert, s_fused.tokens_per_expert)
    if x.numel():
        assert rel_err(y_fused, y_ref) < tol
        assert rel_err(s_fused.aux_loss, s_ref.aux_loss) < 1e-5
    return y_fused


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", CONFIGS)
def test_module_matches_reference(name, dtype, backend):
    cfg = small_config(**CONFIGS[name])
    ref, fused = pair(cfg, dtype, backend)
    compare(ref, fused, torch.randn(67, cfg.d_in, device=DEVICE, dtype=dtype), TOL[dtype])


@pytest.mark.parametrize("shape", [(0, 72), (1, 72), (3, 0, 72), (2, 17, 72)])
def test_module_token_counts(shape, backend):
    ref, fused = pair(small_config(), torch.float32, backend)
    y = compare(ref, fused, torch.randn(*shape, device=DEVICE), TOL[torch.float32])
    assert y.shape == shape[:-1] + (40,)


@pytest.mark.parametrize("live", [[5], [0, 7], [1, 2, 3, 6]])
def test_module_concentrated_routing_and_empty_experts(live, backend):
    cfg = small_config(top_k=min(4, len(live)))
    ref, fused = pair(cfg, torch.float32, backend)
    force_routing(ref, live)
    fused.load_state_dict(ref.state_dict())
    compare(ref, fused, torch.randn(45, cfg.d_in, device=DEVICE), TOL[torch.float32])
    counts = fused.routing_stats().tokens_per_expert
    assert sorted(counts.nonzero().flatten().tolist()) == live


def test_module_is_deterministic(backend):
    cfg = small_config()
    _, fused = pair(cfg, torch.float32, backend)
    x = torch.randn(50, cfg.d_in, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(fused(x), fused(x))


def test_inference_saves_nothing_for_backward(backend):
    _, fused = pair(small_config(), torch.float32, backend)
    x = torch.randn(9, 72, device=DEVICE)
    with torch.no_grad():
        y = fused(x)
    assert y.grad_fn is None and not y.requires_grad
    with torch.inference_mode():
        y_inf = fused(x)
    assert y_inf.is_inference() and torch.equal(y_inf, y)


def test_float64_router_is_torch_only(backend):
    _, fused = pair(small_config(router_dtype="float64"), torch.float32, backend)
    with pytest.raises(ValueError, match="router_dtype"), torch.no_grad():
        fused(torch.randn(3, 72, device=DEVICE))


def test_eager_bodies_and_registered_ops_agree(backend, monkeypatch):
    """Outside torch.compile the wiring calls the ops' plain bodies (less host overhead); the
    registered custom ops (what torch.compile sees) give bit-identical forward and backward."""
    from moe_adapter_kernels import autograd
    cfg = small_config()
    _, fused = pair(cfg, torch.float32, backend)
    x = torch.randn(40, cfg.d_in, device=DEVICE)

    def run():
        xi = x.clone().requires_grad_(True)
        fused.zero_grad(set_to_none=True)
        y = fused(xi)
        (y.square().sum() + fused.aux_loss).backward()
        return [y.detach(), xi.grad] + [p.grad for p in fused.parameters()]

    eager = run()
    if backend == "triton":
        assert autograd.op_set("triton") is autograd.EAGER_KERNELS["triton"]
    monkeypatch.setattr(autograd, "EAGER_KERNELS", {})
    assert autograd.op_set(backend) is autograd.KERNELS[backend]
    registered = run()
    assert all(torch.equal(a, b) for a, b in zip(eager, registered))


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("top_k", [1, 3])
def test_non_finite_rows_stay_in_their_rows(top_k, backend):
    """A token whose input holds NaN or inf gets a NaN output; every other token's output,
    and the routing of the finite tokens, are exactly what the finite input alone gives (the
    router must not hand the permutation an inconsistent routing for the bad rows)."""
    cfg = small_config(top_k=top_k)
    _, fused = pair(cfg, torch.float32, backend)
    x = torch.randn(70, cfg.d_in, device=DEVICE)
    with torch.no_grad():
        clean = fused(x)
        x[[3, 40], 5] = float("nan")
        x[41, 0] = float("inf")
        y = fused(x)
    bad = torch.zeros(70, dtype=torch.bool, device=DEVICE)
    bad[[3, 40, 41]] = True
    assert torch.isnan(y[bad]).all()
    assert torch.equal(y[~bad], clean[~bad])
    assert fused.routing_stats().tokens_per_expert.sum() == 70 * top_k
