"""Gradients of MoEAdapter with each fused backend (``triton``, ``cuda``; the ``backend``
fixture) against the torch backend's autograd.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 and the CUDA kernels under the
CPU emulator (fp32 and fp16, small odd shapes).
"""

import pytest
import torch

from moe_adapter_kernels import MoEAdapter

from helpers import (DEVICE, TOL, VARIANTS, force_routing, programs_in_reverse, rel_err,
                     small_config)

CONFIGS = dict(VARIANTS, **{
    "no-shared-k3": dict(shared_dim=0, top_k=3),
    "softmax-aux": dict(aux_loss_variant="softmax", aux_loss_coef=0.5),
    "post-bias-identity": dict(topology="post", bias=True, expert_activation="swiglu",
                               shared_activation="identity", output_norm=False),
})


def make_pair(cfg, backend, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    ref = MoEAdapter(cfg, backend="torch")
    with torch.no_grad():  # non-trivial norm affine parameters
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    ref = ref.to(DEVICE, dtype)
    fused = MoEAdapter(cfg, backend=backend).to(DEVICE, dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def run(model, x, dy, x_grad=True):
    xi = x.clone().requires_grad_(x_grad)
    y = model(xi)
    ((y.double() * dy.double()).sum() + model.aux_loss).backward()
    return y, xi.grad, {n: p.grad for n, p in model.named_parameters()}


def in_fp64(ref):
    """The reference model in fp64 (its router too): same weights, same frozen parameters."""
    exact = MoEAdapter(ref.config.replace(router_dtype="float64"), backend="torch")
    exact = exact.to(DEVICE, torch.float64)
    exact.load_state_dict(ref.state_dict())
    for p, q in zip(ref.parameters(), exact.parameters()):
        q.requires_grad_(p.requires_grad)
    return exact


def assert_grads_match(ref, fused, x, dy, tol, x_grad=True):
    """The fused model's output and gradients against the reference's. fp32 is judged against
    the reference run in fp64: the fp32 reference's own rounding (up to ~8e-6 where forced
    routing makes the gate gradients cancel) would use up most of the 1e-5 tolerance."""
    exact = x.dtype == torch.float32
    y_r, dx_r, g_r = run(in_fp64(ref) if exact else ref, x.double() if exact else x, dy, x_grad)
    y_t, dx_t, g_t = run(fused, x, dy, x_grad)
    assert rel_err(y_t, y_r) < tol
    if x_grad:
        assert dx_t.dtype == x.dtype and rel_err(dx_t, dx_r) < tol
    for name, p in fused.named_parameters():
        if g_r[name] is None:
            assert g_t[name] is None, name
            continue
        assert g_t[name].dtype == p.dtype, name
        assert rel_err(g_t[name], g_r[name]) < tol, name
    return g_t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_match_reference(name, dtype, backend):
    cfg = small_config(**CONFIGS[name])
    ref, fused = make_pair(cfg, backend, dtype)
    x = torch.randn(61, cfg.d_in, device=DEVICE, dtype=dtype)
    dy = torch.randn(61, cfg.d_out, device=DEVICE)
    assert_grads_match(ref, fused, x, dy, TOL[dtype])


@pytest.mark.parametrize("variant", ["topk", "softmax"])
def test_aux_loss_alone_matches_reference(variant, backend):
    """L_aux and its gradient on their own (the task loss would swamp a wrong one): the router
    weights, the input norm and x get gradients only through the gates."""
    cfg = small_config(aux_loss_variant=variant, aux_loss_coef=1.0)
    ref, fused = make_pair(cfg, backend)
    x = torch.randn(83, cfg.d_in, device=DEVICE)
    grads = []
    for model in (ref, fused):
        xi = x.clone().requires_grad_(True)
        model(xi)
        model.aux_loss.backward()
        grads.append([model.aux_loss.detach(), xi.grad, model.w_gate.grad,
                      model.norm_in.weight.grad])
    for got, want in zip(grads[1], grads[0]):
        assert rel_err(got, want) < 1e-5
    assert grads[1][2].abs().max() > 0


@pytest.mark.parametrize("T", [1, 2])
def test_gradients_tiny_batches(T, backend):
    cfg = small_config()
    ref, fused = make_pair(cfg, backend)
    assert_grads_match(ref, fused, torch.randn(T, cfg.d_in, device=DEVICE),
                       torch.randn(T, cfg.d_out, device=DEVICE), TOL[torch.float32])


def test_empty_batch_backward(backend):
    _, fused = make_pair(small_config(), backend)
    x = torch.randn(0, 72, device=DEVICE, requires_grad=True)
    y = fused(x)
    (y.sum() + fused.aux_loss).backward()
    assert x.grad.shape == (0, 72)
    assert all(p.grad is not None and not p.grad.any() for p in fused.parameters())


@pytest.mark.parametrize("live", [[3], [0, 1, 6]])
def test_empty_experts_get_exact_zero_gradients(live, backend):
    cfg = small_config(top_k=len(live))
    ref, fused = make_pair(cfg, backend)
    force_routing(ref, live)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(40, cfg.d_in, device=DEVICE)
    grads = assert_grads_match(ref, fused, x, torch.randn(40, cfg.d_out, device=DEVICE),
                               TOL[torch.float32])
    for e in range(cfg.num_experts):
        zero = not grads["w1"][e].any() and not grads["w2"][e].any()
        assert zero == (e not in live), e


def test_backward_is_bitwise_deterministic(backend):
    cfg = small_config()
    _, fused = make_pair(cfg, backend)
    x = torch.randn(57, cfg.d_in, device=DEVICE)
    dy = torch.randn(57, cfg.d_out, device=DEVICE)
    first = run(fused, x, dy)
    fused.zero_grad(set_to_none=True)
    second = run(fused, x, dy)
    assert torch.equal(first[1], second[1])
    assert all(torch.equal(first[2][n], second[2][n]) for n in first[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_results_do_not_depend_on_program_order(dtype, backend):
    """Race check (CPU): a forward and backward again with every launch's programs, or CUDA
    blocks and their threads, in reverse order give the same bits. A program that reads what
    another program of the same launch writes, or CUDA threads that exchange data without a
    barrier between write and read, would see other values in the other order."""
    if torch.cuda.is_available():
        pytest.skip("program order is only controllable on the CPU")
    cfg = small_config(expert_activation="swiglu", bias=True, num_experts=4, top_k=2)
    _, fused = make_pair(cfg, backend, dtype)
    x = torch.randn(150, cfg.d_in, device=DEVICE, dtype=dtype)  # 300 pairs: several M tiles
    dy = torch.randn(150, cfg.d_out, device=DEVICE)
    forward = run(fused, x, dy)
    fused.zero_grad(set_to_none=True)
    with programs_in_reverse(backend):
        backward = run(fused, x, dy)
    assert torch.equal(forward[0], backward[0]) and torch.equal(forward[1], backward[1])
    assert all(torch.equal(forward[2][n], backward[2][n]) for n in forward[2])


def test_input_without_grad_and_frozen_weights(backend):
    cfg = small_config()
    ref, fused = make_pair(cfg, backend)
    for m in (ref, fused):
        m.w1.requires_grad_(False)
        m.norm_in.weight.requires_grad_(False)
    x = torch.randn(30, cfg.d_in, device=DEVICE)
    grads = assert_grads_match(ref, fused, x, torch.randn(30, cfg.d_out, device=DEVICE),
                               TOL[torch.float32], x_grad=False)
    assert grads["w1"] is None and grads["norm_in.weight"] is None
    assert grads["w2"] is not None and grads["w_gate"] is not None


def test_gradient_accumulation_over_micro_batches(backend):
    cfg = small_config()
    _, fused = make_pair(cfg, backend)
    xs = [torch.randn(n, cfg.d_in, device=DEVICE) for n in (19, 26)]
    dys = [torch.randn(x.shape[0], cfg.d_out, device=DEVICE) for x in xs]
    separate = []
    for x, dy in zip(xs, dys):
        fused.zero_grad(set_to_none=True)
        separate.append(run(fused, x, dy)[2])
    fused.zero_grad(set_to_none=True)
    for x, dy in zip(xs, dys):
        run(fused, x, dy)
    for name, p in fused.named_parameters():
        assert torch.allclose(p.grad, separate[0][name] + separate[1][name], rtol=1e-5,
                              atol=1e-7), name


def test_autocast_matches_the_reference_under_autocast(backend):
    cfg = small_config()
    ref, fused = make_pair(cfg, backend)
    with torch.no_grad():
        ref.w_gate.mul_(20)  # well-separated logits: no routing flips from bf16 rounding
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(33, cfg.d_in, device=DEVICE)
    dy = torch.randn(33, cfg.d_out, device=DEVICE)
    out = []
    for m in (ref, fused):
        xi = x.clone().requires_grad_(True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = m(xi)
            loss = (y.float() * dy).sum() + m.aux_loss
        loss.backward()
        out.append((y, xi.grad, m.w1.grad, m.shared_w2.grad))
    assert out[1][0].dtype == torch.bfloat16 and out[1][2].dtype == torch.float32
    for a, b in zip(out[1], out[0]):
        assert rel_err(a, b) < 3e-2


@pytest.mark.filterwarnings("ignore:Input #")
def test_gradcheck_tiny(backend):
    cfg = small_config(d_in=8, d_out=6, num_experts=4, top_k=2, expert_dim=5, shared_dim=7)
    _, fused = make_pair(cfg, backend)
    names = [n for n, _ in fused.named_parameters()]
    x = torch.randn(5, 8, device=DEVICE, requires_grad=True)

    def f(x, *params):
        out = torch.func.functional_call(fused, dict(zip(names, params)), (x,))
        return out, fused.aux_loss

    params = tuple(p.detach().clone().requires_grad_(True) for p in fused.parameters())
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-3, atol=2e-3, rtol=2e-2,
                                    nondet_tol=0.0, fast_mode=True)


def test_short_training_run_tracks_the_reference(backend):
    """16 AdamW steps of 24 tokens on a regression over heterogeneous token clusters: the
    fused backend's loss curve tracks the reference backend's (fp32, interpreter-sized; the
    GPU test runs 200 steps at the paper's sizes)."""
    cfg = small_config(d_in=32, d_out=24, expert_dim=16, shared_dim=32)
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(5, cfg.d_in, generator=gen) * 3
    target_map = torch.randn(cfg.d_in, cfg.d_out, generator=gen) / cfg.d_in ** 0.5
    data = []
    for _ in range(16):
        c = torch.randint(0, 5, (24,), generator=gen)
        x = centers[c] + torch.randn(24, cfg.d_in, generator=gen)
        data.append((x.to(DEVICE), torch.tanh(x @ target_map).to(DEVICE)))
    curves = {}
    for name in ("torch", backend):
        torch.manual_seed(1)
        model = MoEAdapter(cfg, backend=name).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
        losses = []
        for x, target in data:
            loss = torch.nn.functional.mse_loss(model(x), target) + model.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[name] = torch.tensor(losses)
    assert curves[backend][-5:].mean() < 0.7 * curves[backend][:5].mean()  # it learns
    assert torch.allclose(curves[backend], curves["torch"], rtol=1e-3)


@pytest.mark.parametrize("T", [29, 41])  # 41 >= d_in: shared_w1 in the main node
def test_deferred_weight_gradients_match_the_single_node(T, backend, monkeypatch):
    """The weight groups' own autograd nodes give the same bits as the main node computing
    every gradient itself (DEFER_WEIGHT_GRADS False, as under torch.compile)."""
    from moe_adapter_kernels import autograd
    cfg = small_config(bias=True, d_in=40)
    _, fused = make_pair(cfg, backend)
    x = torch.randn(T, cfg.d_in, device=DEVICE)
    dy = torch.randn(T, cfg.d_out, device=DEVICE)
    groups = [node.group for node in fused(x).grad_fn.next_functions[0][0].links]
    assert len(groups) == 3 + (T < cfg.d_in)
    deferred = run(fused, x, dy)
    fused.zero_grad(set_to_none=True)
    monkeypatch.setattr(autograd, "DEFER_WEIGHT_GRADS", False)
    single = run(fused, x, dy)
    assert torch.equal(deferred[1], single[1])
    assert all(torch.equal(deferred[2][n], single[2][n]) for n in single[2])


def test_gradient_of_the_input_alone_leaves_no_deferred_work(backend):
    """torch.autograd.grad for x only does not run the weight groups' nodes: the main node
    then leaves them nothing (no tensors held until the graph goes), and the weight groups'
    gradients come when asked for, from the same graph."""
    cfg = small_config()
    ref, fused = make_pair(cfg, backend)
    x = torch.randn(30, cfg.d_in, device=DEVICE, requires_grad=True)
    dy = torch.randn(30, cfg.d_out, device=DEVICE)
    y = fused(x)
    main = y.grad_fn.next_functions[0][0]
    assert type(main).__name__ == "MoEAdapterFunctionBackward"
    (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    assert main.deferred.work == {} and fused.w1.grad is None
    dw1, dw2 = torch.autograd.grad(y, (fused.w1, fused.w2), dy)
    assert main.deferred.work == {}
    y_r = ref(x)
    for got, want in zip((dx, dw1, dw2), torch.autograd.grad(y_r, (x, ref.w1, ref.w2), dy)):
        assert rel_err(got, want) < TOL[torch.float32]


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(reentrant, backend):
    """torch.utils.checkpoint around the adapter (the forward runs again in the backward; the
    weight groups' nodes of the first forward, or of the second, do the weight gradients).
    The reentrant variant runs the first forward under no_grad, so aux_loss has no graph
    there (the README says so): that case trains without it."""
    from torch.utils.checkpoint import checkpoint
    cfg = small_config(aux_loss_coef=0.0 if reentrant else 0.01)
    _, fused = make_pair(cfg, backend)
    x = torch.randn(30, cfg.d_in, device=DEVICE)
    dy = torch.randn(30, cfg.d_out, device=DEVICE)
    plain = run(fused, x, dy)
    fused.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    y = checkpoint(fused, xi, use_reentrant=reentrant)
    assert fused.aux_loss.requires_grad != reentrant
    ((y.double() * dy.double()).sum() + fused.aux_loss).backward()
    assert torch.equal(y, plain[0]) and torch.equal(xi.grad, plain[1])
    assert all(torch.equal(p.grad, plain[2][n]) for n, p in fused.named_parameters())


def test_differentiating_the_gradients_is_a_clear_error(backend):
    """create_graph=True (a gradient penalty, WGAN-GP style: the upstream gradient a constant)
    gives the usual first-order gradients, bit for bit, and differentiating them raises: the
    fused backward has no second derivative, and gradients without a graph would count as
    constants in the penalty without a word. The torch backend differentiates them."""
    cfg = small_config(bias=True)
    ref, fused = make_pair(cfg, backend)
    x = torch.randn(30, cfg.d_in, device=DEVICE, requires_grad=True)
    dy = torch.randn(30, cfg.d_out, device=DEVICE)
    params = (x, fused.w1, fused.shared_w2)
    first = torch.autograd.grad(fused(x), params, dy)
    second = torch.autograd.grad(fused(x), params, dy, create_graph=True)
    assert all(g.requires_grad and torch.equal(g, f) for g, f in zip(second, first))
    penalty = second[0].square().sum() + fused(x).sum()
    with pytest.raises(RuntimeError, match=f"the {backend} backend's backward is first-order"):
        penalty.backward()
    (gx,) = torch.autograd.grad(ref(x), x, dy, create_graph=True)
    gx.square().sum().backward()
    assert ref.w1.grad is not None and ref.w1.grad.abs().sum() > 0
