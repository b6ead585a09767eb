"""Shared test utilities: relative error, small configs, routing control."""

import torch

from moe_adapter_kernels import MoEAdapterConfig
from moe_adapter_kernels.check import rel_err  # noqa: F401  (re-exported for the tests)


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
