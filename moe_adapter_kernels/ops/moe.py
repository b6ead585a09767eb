"""The fused forward pipeline: norm -> route -> permute -> expert up/down -> shared -> combine."""

from __future__ import annotations

import torch

from .. import reference
from ..config import MoEAdapterConfig
from .combine import combine
from .grouped_gemm import expert_down, expert_up, linear
from .norm import norm
from .permute import permute
from .router import route


def _norm(x, p, name, cfg):
    if cfg.norm == "none":
        return x
    return norm(x, p.get(name + ".weight"), p.get(name + ".bias"), cfg.norm, cfg.norm_eps)[0]


def _combine(y_pairs, shared, p, name, cfg):
    return combine(y_pairs, shared, cfg.top_k, cfg.norm, p.get(name + ".weight"),
                   p.get(name + ".bias"), cfg.norm_eps)[0]


def moe_adapter_forward(x: torch.Tensor, p: dict, cfg: MoEAdapterConfig):
    """MoE-Adapter forward with the Triton kernels; same contract as
    :func:`moe_adapter_kernels.reference.moe_adapter`: (y [T, d_out], routing, L_aux)."""
    if cfg.router_dtype != "float32":
        raise ValueError(f"router_dtype={cfg.router_dtype!r} is only supported by the torch "
                         "backend; the Triton router computes in float32")
    x = x.contiguous()
    u = _norm(x, p, "norm_in", cfg)
    logits, ids, weights, block_counts = route(u, p["w_gate"], cfg.top_k)
    sorted_pair, _, offsets = permute(ids, block_counts, cfg.num_experts)
    h = expert_up(u, p["w1"], sorted_pair, offsets, cfg.top_k, cfg.expert_activation)
    y_pairs = expert_down(h, p["w2"], sorted_pair, offsets, weights)
    if cfg.topology == "shared":
        shared = None
        if cfg.shared_dim:
            shared = linear(linear(u, p["shared_w1"], "silu"), p["shared_w2"], "none")
        y = _combine(y_pairs, shared, p, "norm_out", cfg)
    else:
        h_mid = _combine(y_pairs, None, p, "norm_mid", cfg)
        a = linear(linear(h_mid, p["shared_w1"], "silu"), p["shared_w2"], "none")
        y = _norm(a, p, "norm_out", cfg)
    routing = reference.Routing(logits, ids, weights)
    return y, routing, reference.aux_loss(routing, cfg.num_experts, cfg.aux_loss_variant)
