"""Pure-PyTorch MoE-Adapter, written to read like the paper's equations.

This is the oracle every kernel is tested against and the ``torch`` backend of the modules.
Every function takes plain tensors (weights laid out ``[in, out]``, experts stacked ``[E, ...]``)
so the same code serves the modules, the tests and the benchmarks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import MoEAdapterConfig


def norm(x: torch.Tensor, kind: str, weight, bias, eps: float) -> torch.Tensor:
    """N(.): LayerNorm or RMSNorm over the last dim, statistics in (at least) fp32, result in
    x's dtype."""
    if kind == "none":
        return x
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    w = None if weight is None else weight.to(acc)
    if kind == "layernorm":
        b = None if bias is None else bias.to(acc)
        y = F.layer_norm(xf, (x.shape[-1],), w, b, eps)
    else:
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if w is not None:
            y = y * w
    return y.to(x.dtype)


def activation(z: torch.Tensor, kind: str) -> torch.Tensor:
    """SiLU, exact (erf) GELU, identity, or SwiGLU on z = [gate | up]: SiLU(gate) * up."""
    if kind == "swiglu":
        gate, up = z.chunk(2, dim=-1)
        return F.silu(gate) * up
    if kind == "gelu":
        return F.gelu(z)
    return F.silu(z) if kind == "silu" else z


def mlp(u: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, act: str = "silu", b1=None,
        b2=None, return_preact: bool = False):
    """W2 act(W1 u + b1) + b2 (biases optional). SwiGLU: w1 holds [gate | up].
    ``return_preact``: (y, W1 u + b1)."""
    z = u @ w1
    if b1 is not None:
        z = z + b1
    y = activation(z, act) @ w2
    y = y if b2 is None else y + b2
    return (y, z) if return_preact else y


class Routing(NamedTuple):
    """Router output for T tokens. ``probs`` are the router's full-softmax probabilities,
    used only by the Switch/GShard aux-loss variant."""

    logits: torch.Tensor        # [T, E] fp32, s = u W_g
    topk_ids: torch.Tensor      # [T, k] int64, descending logit, ties to the lower index
    topk_weights: torch.Tensor  # [T, k] fp32, softmax over the k kept logits (eq. 3)


def topk_lowest_index(s: torch.Tensor, k: int):
    """Top-k values and indices of the last dim, ties broken towards the lowest index."""
    values, ids = torch.sort(s, dim=-1, descending=True, stable=True)
    return values[..., :k], ids[..., :k]


def route(u: torch.Tensor, w_gate: torch.Tensor, k: int, router_dtype=torch.float32) -> Routing:
    """Eq. 3: s = u W_g in fp32, keep the top k logits, softmax over those k only."""
    s = u.to(router_dtype) @ w_gate.to(router_dtype)
    kept, ids = topk_lowest_index(s, k)
    return Routing(s, ids, torch.softmax(kept, dim=-1))


def routed_experts(u: torch.Tensor, routing: Routing, w1: torch.Tensor, w2: torch.Tensor,
                   act: str, b1=None, b2=None) -> torch.Tensor:
    """Eq. 4: h = sum_{i in I} G_i E_i(u), summed in fp32.

    The (token, slot) pairs are sorted by expert (stable), each expert runs once on its rows,
    and the results are put back in pair order: no atomics, so it is deterministic.
    """
    T, k = routing.topk_ids.shape
    E = w1.shape[0]
    if torch.compiler.is_compiling():
        return _routed_experts_dense(u, routing, w1, w2, act, b1, b2)
    flat = routing.topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    rows = u[order // k]
    out = torch.empty(T * k, w2.shape[-1], dtype=u.dtype, device=u.device)
    start = 0
    for e in range(E):
        end = start + counts[e]
        out[order[start:end]] = mlp(rows[start:end], w1[e], w2[e], act,
                                    None if b1 is None else b1[e], None if b2 is None else b2[e])
        start = end
    out = out.view(T, k, w2.shape[-1]).float() * routing.topk_weights.unsqueeze(-1).float()
    return out.sum(dim=1)


def _routed_experts_dense(u, routing, w1, w2, act, b1, b2):
    """Eq. 4 with every expert on every token, weighted by a gate that is exactly 0 off the
    top-k: no data-dependent shapes, so torch.compile(fullgraph=True) traces it without a host
    sync (at E/k times the routed FLOPs; the Triton backend is the fast compiled path)."""
    E = w1.shape[0]
    gate = torch.zeros(u.shape[0], E, device=u.device, dtype=torch.float32).scatter(
        1, routing.topk_ids.long(), routing.topk_weights.float())
    h = torch.zeros(u.shape[0], w2.shape[-1], device=u.device, dtype=torch.float32)
    for e in range(E):
        y = mlp(u, w1[e], w2[e], act, None if b1 is None else b1[e],
                None if b2 is None else b2[e])
        h = h + gate[:, e:e + 1] * y.float()
    return h


def aux_loss(routing: Routing, num_experts: int, variant: str = "topk") -> torch.Tensor:
    """Eqs. 8-10: L_aux = E * sum_e P_e f_e.

    P_e is the mean gate probability (``topk``: the renormalised top-k gate G, as the paper
    writes it; ``softmax``: the full softmax, Switch/GShard) and f_e the fraction of tokens
    that selected e (not differentiable). Uniform routing gives L_aux = k.
    """
    T = routing.topk_ids.shape[0]
    if T == 0:
        return routing.logits.sum() * 0.0
    ids = routing.topk_ids.long()
    if variant == "softmax":
        p = torch.softmax(routing.logits.float(), dim=-1)
    else:
        p = torch.zeros_like(routing.logits, dtype=torch.float32).scatter(
            -1, ids, routing.topk_weights.float())
    selected = torch.zeros_like(p).scatter(-1, ids, 1.0)
    return num_experts * (p.mean(0) * selected.mean(0)).sum()


class RoutingStats(NamedTuple):
    """Routing statistics of one forward (detached)."""

    tokens_per_expert: torch.Tensor  # [E] int64: (token, slot) pairs each expert received
    mean_gate: torch.Tensor          # [E] fp32: P_e, mean top-k gate probability per expert
    aux_loss: torch.Tensor           # scalar: unscaled L_aux


def routing_stats(routing: Routing, num_experts: int, l_aux: torch.Tensor) -> RoutingStats:
    ids = routing.topk_ids.long()
    T, dev = ids.shape[0], ids.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(
        0, ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.int64, device=dev))
    gate = torch.zeros(T, num_experts, device=dev).scatter(
        -1, ids, routing.topk_weights.detach().float())
    mean_gate = gate.mean(0) if T else gate.sum(0)
    return RoutingStats(counts, mean_gate, l_aux.detach())


def _norm_and_shared(p: dict, cfg: MoEAdapterConfig):
    """N(t, position) and S(t), the norms and the shared / aggregation MLP, over params p."""
    def N(t, pos):
        return norm(t, cfg.norm_at(pos), p.get(f"norm_{pos}.weight"), p.get(f"norm_{pos}.bias"),
                    cfg.norm_eps)

    def shared(t):
        return mlp(t, p["shared_w1"], p["shared_w2"], cfg.shared_activation, p.get("shared_b1"),
                   p.get("shared_b2"))
    return N, shared


def moe_adapter(x: torch.Tensor, p: dict, cfg: MoEAdapterConfig):
    """The whole MoE-Adapter on x [T, d_in] with parameters ``p`` (the module's names).

    Returns (y [T, d_out], routing, unscaled L_aux).
    """
    N, shared = _norm_and_shared(p, cfg)
    u = N(x, "in")
    routing = route(u, p["w_gate"], cfg.top_k, getattr(torch, cfg.router_dtype))
    h = routed_experts(u, routing, p["w1"], p["w2"], cfg.expert_activation, p.get("b1"),
                       p.get("b2"))
    if cfg.topology == "shared":
        if cfg.shared_dim:
            h = h + shared(u).float()
        y = N(h, "out").to(x.dtype)
    else:
        y = N(shared(N(h, "mid").to(x.dtype)), "out")
    return y, routing, aux_loss(routing, cfg.num_experts, cfg.aux_loss_variant)


def dense_adapter(x: torch.Tensor, p: dict, norm_kind: str, eps: float) -> torch.Tensor:
    """Eq. 1: y = N(W2 SiLU(W1 N(x)))."""
    u = norm(x, norm_kind, p.get("norm_in.weight"), p.get("norm_in.bias"), eps)
    return norm(mlp(u, p["w1"], p["w2"]), norm_kind, p.get("norm_out.weight"),
                p.get("norm_out.bias"), eps)


def moe_adapter_per_token(x: torch.Tensor, p: dict, cfg: MoEAdapterConfig) -> torch.Tensor:
    """Slow oracle straight from eqs. 2-5: one token at a time, top-k by a Python sort.

    Shares no routing or permutation code with :func:`moe_adapter`; used by tests and
    ``moe-adapter check``. Returns y [T, d_out] in fp32.
    """
    f = {name: t.detach().double() for name, t in p.items()}
    N, shared = _norm_and_shared(f, cfg)

    rows = []
    for xb in x.detach().double():
        u = N(xb, "in")
        s = (u @ f["w_gate"]).tolist()
        chosen = sorted(range(cfg.num_experts), key=lambda e: (-s[e], e))[: cfg.top_k]
        z = [s[e] for e in chosen]
        gates = [math.exp(v - max(z)) for v in z]
        gates = [g / sum(gates) for g in gates]
        h = sum(g * mlp(u, f["w1"][e], f["w2"][e], cfg.expert_activation,
                        f["b1"][e] if "b1" in f else None, f["b2"][e] if "b2" in f else None)
                for g, e in zip(gates, chosen))
        if cfg.topology == "shared":
            if cfg.shared_dim:
                h = h + shared(u)
            rows.append(N(h, "out"))
        else:
            rows.append(N(shared(N(h, "mid")), "out"))
    if not rows:
        return x.new_zeros(0, cfg.d_out, dtype=torch.float32)
    return torch.stack(rows).float()
