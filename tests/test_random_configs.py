"""Random configurations (every topology, activation, norm, bias, k, size, dtype, token count,
frozen parameters) through each fused backend, forward and every gradient, against the
reference. A few seeds run in CI; for a long search run the file itself:

    python tests/test_random_configs.py triton 0 500     # backend, first seed, how many

An error counts only where it is real: the fused result must be within tolerance of the
reference computed in the same dtype, or else no further from the fp64 reference (router in
fp64 too) than rounding explains: 10x the same-dtype reference's own error, and 30x how far the
fp64 result moves when the inputs and weights are perturbed at the dtype's rounding. Without
that second test, tiny cases fail on rounding alone: ill-conditioned gradients (e.g. a
scale-invariant RMSNorm of rank-1 expert outputs), or at T = 1 with a large aux-loss
coefficient, router gradients ~1e-4 beside aux terms ~E, where fp32 sums in another order
differ at 1e-3. Non-finite values are wrong only where the same-dtype reference has none: some
fp16 cases overflow a gradient that must be materialised in fp16 (e.g. a middle RMSNorm of
tiny expert outputs, rstd ~300), and both implementations then give inf/NaN, not always in
the same gradients.
"""

import os
import random
import sys

import pytest
import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("MOE_ADAPTER_CUDA_EMULATE", "1")

from moe_adapter_kernels import MoEAdapter, MoEAdapterConfig  # noqa: E402

from helpers import DEVICE, TOL, rel_err  # noqa: E402  (tests/ is on the path either way)

ROUNDING = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def random_case(seed: int):
    """(config, dtype, x, dy, frozen parameter names, whether x requires grad) for ``seed``."""
    r = random.Random(seed)
    topology = r.choice(["shared", "post"])
    E = r.choice([1, 2, 3, 4, 5, 8, 16])
    cfg = MoEAdapterConfig(
        d_in=r.choice([8, 16, 33, 72, 130]), d_out=r.choice([8, 17, 40, 64]), num_experts=E,
        top_k=r.randint(1, E), expert_dim=r.choice([1, 7, 16, 24, 70]),
        shared_dim=r.choice([0, 5, 56, 128] if topology == "shared" else [5, 56, 128]),
        topology=topology, expert_activation=r.choice(["silu", "swiglu", "gelu", "identity"]),
        shared_activation=r.choice(["silu", "gelu", "identity"]), bias=r.random() < 0.4,
        norm=r.choice(["layernorm", "rmsnorm", "none"]), input_norm=r.random() < 0.8,
        output_norm=r.random() < 0.8, aux_loss_variant=r.choice(["topk", "softmax"]),
        aux_loss_coef=r.choice([0.0, 0.01, 1.0]))
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
    dtype = r.choice(dtypes)
    T = r.choice([0, 1, 2, 3, 17, 64, 131])
    lead = r.choice([(T,), (1, T), (T, 1)])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, cfg.d_in, generator=g) * r.choice([0.1, 1.0, 10.0])
    dy = torch.randn(*lead, cfg.d_out, generator=g)
    names = [n for n, _ in MoEAdapter(cfg, backend="torch").named_parameters()]
    frozen = {n for n in names if r.random() < 0.2}
    return cfg, dtype, x.to(DEVICE, dtype), dy.to(DEVICE), frozen, r.random() < 0.8


def gradients(model, x, dy, frozen, x_grad):
    """{name: tensor} of y, the aux loss, dx and every parameter's gradient."""
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    xi = x.clone().requires_grad_(x_grad)
    y = model(xi)
    loss = (y.float() * dy).sum() + model.aux_loss
    if loss.requires_grad:  # not when x and every parameter are frozen
        loss.backward()
    out = dict(y=y.detach(), aux=model.aux_loss.detach(), dx=xi.grad)
    out.update({n: p.grad for n, p in model.named_parameters()})
    return out


def mismatches(seed: int, backend: str) -> dict:
    """{what: why} for every output or gradient of ``backend`` that is wrong on ``seed``."""
    cfg, dtype, x, dy, frozen, x_grad = random_case(seed)
    torch.manual_seed(seed)
    ref = MoEAdapter(cfg, backend="torch")
    with torch.no_grad():  # non-trivial norm affine parameters and biases
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    weights = {n: w.to(DEVICE, dtype).double() for n, w in ref.state_dict().items()}

    def run(backend, dt, perturb=0.0):
        """Every backend and dtype runs the same (dtype-rounded) weights and inputs, each
        value scaled by 1 + perturb * N(0, 1) where perturb is given."""
        g = torch.Generator(device=DEVICE).manual_seed(1)

        def scaled(t):
            return t * (1 + perturb * torch.randn(t.shape, generator=g, device=DEVICE,
                                                   dtype=t.dtype))
        exact = dt == torch.float64  # with the router in fp64 too
        model = MoEAdapter(cfg.replace(router_dtype="float64") if exact else cfg,
                           backend=backend).to(DEVICE, torch.float64)
        model.load_state_dict({n: scaled(w) for n, w in weights.items()})
        return gradients(model.to(dt), scaled(x.double()).to(dt), dy.to(dt), frozen, x_grad)

    want, got = run("torch", dtype), run(backend, dtype)
    exact, moved = {}, {}
    bad = {}
    reference_finite = all(v is None or v.isfinite().all() for v in want.values())
    for name, w in want.items():
        t = got[name]
        if (w is None) != (t is None):
            bad[name] = f"gradient {'missing' if t is None else 'unexpected'}"
            continue
        if w is None or not w.numel():
            continue
        if t.shape != w.shape or t.dtype != w.dtype:
            bad[name] = f"{tuple(t.shape)} {t.dtype}, want {tuple(w.shape)} {w.dtype}"
            continue
        if not t.isfinite().all():
            if reference_finite:
                bad[name] = "non-finite values"
            continue  # else the case overflows this dtype: the reference's results do too
        tol = TOL[dtype] * (1 if name == "y" else 3)
        if rel_err(t, w) <= tol or (not w.any() and not t.any()):
            continue
        if not exact:
            exact.update(run("torch", torch.float64))
            moved.update(run("torch", torch.float64, ROUNDING[dtype]))
        scale = max(float(v.norm()) for v in exact.values() if v is not None and v.numel())
        e_got, e_want = rel_err(t.double(), exact[name]), rel_err(w.double(), exact[name])
        e_moved = rel_err(moved[name], exact[name])
        negligible = float(exact[name].norm()) <= 1e-6 * scale  # zero but for rounding
        if not negligible and e_got > max(tol, 10 * e_want, 30 * e_moved):
            bad[name] = (f"rel_err {rel_err(t, w):.1e} to the {dtype} reference; to fp64 "
                         f"{e_got:.1e} (reference {e_want:.1e}, perturbed fp64 {e_moved:.1e})")
    return bad


@pytest.mark.parametrize("seed", range(8))
def test_random_configs_match_reference(seed, backend):
    assert not mismatches(seed, backend), random_case(seed)[0]


if __name__ == "__main__":
    backend, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    failed = 0
    for seed in range(first, first + count):
        bad = mismatches(seed, backend)
        if bad:
            failed += 1
            cfg, dtype, x, *_ = random_case(seed)
            print(f"seed {seed}: {bad}\n  {cfg}, {dtype}, x {tuple(x.shape)}", flush=True)
        if (seed - first + 1) % 50 == 0:
            print(f"[{seed - first + 1}/{count}] {failed} failed", file=sys.stderr, flush=True)
    print(f"{backend}: {failed} of {count} seeds failed")
    sys.exit(1 if failed else 0)
