"""The pure-PyTorch reference against the equations: a per-token oracle and hand computations."""

import math

import pytest
import torch

from moe_adapter_kernels import MoEAdapter, reference
from moe_adapter_kernels.reference import Routing

from helpers import VARIANTS, force_routing, rel_err, small_config

CONFIGS = dict(VARIANTS, **{
    "no-shared": dict(shared_dim=0),
    "16c4": dict(num_experts=16, top_k=4),
    "identity-no-norms": dict(expert_activation="identity", shared_activation="identity",
                              input_norm=False, output_norm=False, bias=True),
    "post-bias": dict(topology="post", bias=True, input_norm=False),
})


@pytest.mark.parametrize("name", CONFIGS)
def test_vectorised_reference_equals_per_token_loop(name):
    torch.manual_seed(1)
    cfg = small_config(**CONFIGS[name])
    model = MoEAdapter(cfg, backend="torch")
    with torch.no_grad():  # non-trivial norm affine parameters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(53, cfg.d_in)
    y = model(x)
    oracle = reference.moe_adapter_per_token(x, dict(model.named_parameters()), cfg)
    assert rel_err(y, oracle) < 1e-5


def test_topk_breaks_ties_towards_lowest_index():
    s = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    vals, ids = reference.topk_lowest_index(s, 3)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    assert vals.tolist() == [[3.0, 3.0, 3.0], [2.0, 2.0, 2.0]]


def test_softmax_is_over_the_kept_logits_only():
    s = torch.tensor([[0.5, 2.0, -1.0, 1.0]])
    r = reference.route(s, torch.eye(4), k=2)
    assert r.topk_ids.tolist() == [[1, 3]]
    a, b = math.exp(2.0), math.exp(1.0)
    assert torch.allclose(r.topk_weights, torch.tensor([[a / (a + b), b / (a + b)]]))
    assert r.logits.dtype == torch.float32


def test_aux_loss_by_hand_topk_variant():
    ids = torch.tensor([[0, 1], [1, 2], [0, 3]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    r = Routing(torch.zeros(3, 4), ids, w)
    # P = [1.6, 0.9, 0.4, 0.1] / 3, f = [2, 2, 1, 1] / 3, L = 4 * sum(P f)
    assert reference.aux_loss(r, 4, "topk").item() == pytest.approx(4 * 5.5 / 9, rel=1e-6)


def test_aux_loss_by_hand_softmax_variant():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0], [math.log(4.0), 0.0]])
    r = reference.route(logits, torch.eye(2), k=1)
    assert r.topk_ids.flatten().tolist() == [1, 0, 0]  # the tie goes to expert 0
    # full softmax P = [0.25+0.5+0.8, 0.75+0.5+0.2] / 3, f = [2, 1] / 3
    assert reference.aux_loss(r, 2, "softmax").item() == pytest.approx(2 * 4.55 / 9, rel=1e-6)
    # top-k gate with k=1 is one-hot: P = f = [2, 1] / 3
    assert reference.aux_loss(r, 2, "topk").item() == pytest.approx(2 * 5 / 9, rel=1e-6)


@pytest.mark.parametrize("variant", ["topk", "softmax"])
@pytest.mark.parametrize("E,k", [(8, 4), (4, 2), (8, 1)])
def test_aux_loss_is_k_at_uniform_routing(variant, E, k):
    # token t prefers experts t, t+1, ..., t+k-1 (mod E) equally: a cyclic, balanced pattern
    logits = torch.full((E, E), -2.0)
    for t in range(E):
        for j in range(k):
            logits[t, (t + j) % E] = 1.0
    r = reference.route(logits, torch.eye(E), k=k)
    assert reference.aux_loss(r, E, variant).item() == pytest.approx(k, rel=1e-6)


def test_aux_loss_gradient_reaches_the_gate():
    torch.manual_seed(0)
    model = MoEAdapter(small_config(), backend="torch")
    model(torch.randn(20, 72))
    model.aux_loss.backward()
    assert model.w_gate.grad.abs().sum() > 0
    assert model.w1.grad is None  # the aux loss depends on the router only


def test_every_parameter_gets_a_gradient_and_empty_experts_get_exact_zeros():
    torch.manual_seed(0)
    cfg = small_config()
    model = MoEAdapter(cfg, backend="torch")
    live = [0, 2, 5, 6]
    force_routing(model, live)
    x = torch.randn(31, cfg.d_in)
    y = model(x)
    assert sorted(model.routing_stats().tokens_per_expert.nonzero().flatten().tolist()) == live
    (y.square().mean() + model.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for e in range(cfg.num_experts):
        got = (model.w1.grad[e].abs().sum() + model.w2.grad[e].abs().sum()).item()
        assert (got > 0) if e in live else (got == 0.0), e
    assert model.shared_w1.grad.abs().sum() > 0 and model.w_gate.grad.abs().sum() > 0


def test_all_tokens_to_one_expert():
    torch.manual_seed(0)
    cfg = small_config(top_k=1)
    model = MoEAdapter(cfg, backend="torch")
    force_routing(model, [3])
    x = torch.randn(17, cfg.d_in)
    y = model(x)
    assert model.routing_stats().tokens_per_expert.tolist() == [0, 0, 0, 17, 0, 0, 0, 0]
    assert rel_err(y, reference.moe_adapter_per_token(x, dict(model.named_parameters()), cfg)) \
        < 1e-5


def test_dense_reference_is_equation_1():
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    p = {"w1": torch.randn(16, 32), "w2": torch.randn(32, 8)}
    ln = torch.nn.functional.layer_norm
    expected = ln(torch.nn.functional.silu(ln(x, (16,)) @ p["w1"]) @ p["w2"], (8,))
    assert rel_err(reference.dense_adapter(x, p, "layernorm", 1e-5), expected) < 1e-6


def test_rmsnorm_matches_definition():
    x, w = torch.randn(4, 10), torch.randn(10)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert rel_err(reference.norm(x, "rmsnorm", w, None, 1e-6), expected) < 1e-6
