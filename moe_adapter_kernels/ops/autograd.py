"""Autograd wiring of the fused MoE-Adapter: one ``torch.autograd.Function`` whose forward and
backward are sequences of the registered ``moe_adapter::*`` ops.

Saved for backward (the fewest tensors that avoid a second forward through the GEMMs):
- x and the input norm's mean/rstd: u = N(x) is recomputed (one cheap pass) instead of kept;
- the routing (topk ids and weights, sorted pair ids, expert offsets): a few ints per pair;
- the routed up-projection's pre-activation [T*k, F'] (sorted): the activation, its derivative
  and the hidden h are recomputed from it inside the backward kernels, so h is never stored;
- shared topology: the shared MLP's pre-activation [T, S] and the final norm's input z [T, D];
- post topology: the middle norm's input [T, d_in], the aggregation MLP's pre-activation [T, S]
  and the final norm's input [T, D].
The aux loss is computed outside, in PyTorch, from the returned logits and gate weights; its
gradient flows back into this Function through them.
"""

from __future__ import annotations

import torch

from ..config import MoEAdapterConfig
from .combine import combine
from .grouped_gemm import expert_dact, expert_down, expert_dx, expert_up, linear, linear_dact
from .norm import norm, norm_bwd
from .permute import permute
from .router import route
from .weight_grad import weight_grad_op

PARAMS = ("w_gate", "w1", "w2", "shared_w1", "shared_w2", "norm_in.weight", "norm_in.bias",
          "norm_mid.weight", "norm_mid.bias", "norm_out.weight", "norm_out.bias")


def _norm(x, w, b, cfg):
    """(N(x), mean, rstd); identity with empty statistics for norm 'none'."""
    if cfg.norm == "none":
        return x, x.new_empty(0), x.new_empty(0)
    return norm(x, w, b, cfg.norm, cfg.norm_eps)


def _norm_grad(dy, x, w, b, mean, rstd, cfg):
    if cfg.norm == "none":
        return dy, None, None
    dx, dw, db = norm_bwd(dy, x, w, b, mean, rstd, cfg.norm)
    return dx, (dw if w is not None else None), (db if b is not None else None)


def fused_forward(cfg: MoEAdapterConfig, x, prm: dict, save: bool):
    """The forward pipeline on x [T, d_in]. Returns (y, logits, topk_weights, topk_ids, saved)
    where saved holds what the backward needs (empty when ``save`` is False)."""
    k = cfg.top_k
    u, mean_in, rstd_in = _norm(x, prm["norm_in.weight"], prm["norm_in.bias"], cfg)
    logits, ids, gates, block_counts = route(u, prm["w_gate"], k)
    sorted_pair, _, offsets = permute(ids, block_counts, cfg.num_experts)
    h, pre1 = expert_up(u, prm["w1"], sorted_pair, offsets, k, cfg.expert_activation, save)
    y_pairs = expert_down(h, prm["w2"], sorted_pair, offsets, gates)
    del h
    saved = dict(mean_in=mean_in, rstd_in=rstd_in, ids=ids, gates=gates,
                 sorted_pair=sorted_pair, offsets=offsets, pre1=pre1)
    w_out, b_out = prm["norm_out.weight"], prm["norm_out.bias"]
    if cfg.topology == "shared":
        shared, pre_s = None, None
        if cfg.shared_dim:
            hs, pre_s = linear(u, prm["shared_w1"], "silu", save)
            shared = linear(hs, prm["shared_w2"], "none")[0]
        y, mean_out, rstd_out, z = combine(y_pairs, shared, k, cfg.norm, w_out, b_out,
                                           cfg.norm_eps, save)
    else:
        hm, mean_mid, rstd_mid, zm = combine(y_pairs, None, k, cfg.norm, prm["norm_mid.weight"],
                                             prm["norm_mid.bias"], cfg.norm_eps, save)
        ha, pre_s = linear(hm, prm["shared_w1"], "silu", save)
        z = linear(ha, prm["shared_w2"], "none")[0]
        y, mean_out, rstd_out = _norm(z, w_out, b_out, cfg)
        saved.update(zm=zm, mean_mid=mean_mid, rstd_mid=rstd_mid)
    saved.update(pre_s=pre_s, z=z, mean_out=mean_out, rstd_out=rstd_out)
    return y, logits, gates, ids, (saved if save else {})


def _routed_backward(cfg, dz, u, prm, s, dgates_in, need):
    """Gradients through the routed experts given dz, the gradient of their gate-weighted sum.
    Returns (du [T, d] fp32 or None, dw1, dw2, dgates [T, k] fp32)."""
    k, act = cfg.top_k, cfg.expert_activation
    sp, off, gates = s["sorted_pair"], s["offsets"], s["gates"]
    dpre1, dgates = expert_dact(dz, prm["w2"], s["pre1"], sp, off, gates, k, act)
    dw2 = weight_grad_op(s["pre1"], dz, off, sp, 0, k, gates.reshape(-1), act) \
        if need["w2"] else None
    dw1 = weight_grad_op(u, dpre1, off, sp, k, 0, None, "none") if need["w1"] else None
    du = None
    if need["u"]:
        du = expert_dx(dpre1, prm["w1"], sp, off).view(-1, k, u.shape[1]).sum(1, dtype=torch.float32)
    return du, dw1, dw2, dgates + dgates_in


def _mlp_backward(dc, a, pre, w1, w2, need1, need2, need_a):
    """Gradients of c = SiLU(a @ w1) @ w2 given dc, the input a and the saved a @ w1."""
    dpre = linear_dact(dc, w2, pre, "silu")
    dw2 = weight_grad_op(pre, dc, None, None, 0, 0, None, "silu") if need2 else None
    dw1 = weight_grad_op(a, dpre, None, None, 0, 0, None, "none") if need1 else None
    da = linear(dpre, w1.t(), "none")[0] if need_a else None
    return da, dw1, dw2


class MoEAdapterFunction(torch.autograd.Function):
    """y, logits, topk_weights, topk_ids = MoEAdapterFunction.apply(cfg, x, *params) with
    params in the order of :data:`PARAMS` (None where the config has none)."""

    @staticmethod
    def forward(ctx, cfg, x, *params):
        prm = dict(zip(PARAMS, params))
        y, logits, gates, ids, saved = fused_forward(cfg, x, prm, save=True)
        ctx.cfg = cfg
        ctx.names = list(saved)
        ctx.save_for_backward(x, *params, *saved.values())
        ctx.mark_non_differentiable(ids)
        return y, logits, gates, ids

    @staticmethod
    def backward(ctx, dy, dlogits, dgates_aux, _):
        cfg = ctx.cfg
        tensors = ctx.saved_tensors
        x = tensors[0]
        prm = dict(zip(PARAMS, tensors[1:1 + len(PARAMS)]))
        s = dict(zip(ctx.names, tensors[1 + len(PARAMS):]))
        needs = dict(zip(("x",) + PARAMS, ctx.needs_input_grad[1:]))
        need_u = needs["x"] or needs["norm_in.weight"] or needs["norm_in.bias"]
        grads = dict.fromkeys(PARAMS)
        dy = dy.contiguous()
        u = _norm(x, prm["norm_in.weight"], prm["norm_in.bias"], cfg)[0]

        dz, grads["norm_out.weight"], grads["norm_out.bias"] = _norm_grad(
            dy, s["z"], prm["norm_out.weight"], prm["norm_out.bias"], s["mean_out"],
            s["rstd_out"], cfg)
        du_shared = None
        if cfg.topology == "shared":
            dz_routed = dz
            if cfg.shared_dim:
                du_shared, grads["shared_w1"], grads["shared_w2"] = _mlp_backward(
                    dz, u, s["pre_s"], prm["shared_w1"], prm["shared_w2"],
                    needs["shared_w1"], needs["shared_w2"], need_u)
        else:
            hm = _norm(s["zm"], prm["norm_mid.weight"], prm["norm_mid.bias"], cfg)[0]
            dhm, grads["shared_w1"], grads["shared_w2"] = _mlp_backward(
                dz, hm, s["pre_s"], prm["shared_w1"], prm["shared_w2"], needs["shared_w1"],
                needs["shared_w2"], True)
            dz_routed, grads["norm_mid.weight"], grads["norm_mid.bias"] = _norm_grad(
                dhm, s["zm"], prm["norm_mid.weight"], prm["norm_mid.bias"], s["mean_mid"],
                s["rstd_mid"], cfg)
        need = {"w1": needs["w1"], "w2": needs["w2"], "u": need_u}
        du, grads["w1"], grads["w2"], dgates = _routed_backward(
            cfg, dz_routed.contiguous(), u, prm, s, dgates_aux.float(), need)

        # softmax over the k kept logits, then scatter into the E logits (distinct per token)
        gates = s["gates"]
        dkept = gates * (dgates - (gates * dgates).sum(-1, keepdim=True))
        dlogits = dlogits.float().scatter_add(1, s["ids"].long(), dkept)
        wg = prm["w_gate"]
        if needs["w_gate"]:
            grads["w_gate"] = (u.float().t() @ dlogits).to(wg.dtype)
        dx = None
        if need_u:
            du = du + dlogits @ wg.float().t()
            if du_shared is not None:
                du = du + du_shared.float()
            dx, grads["norm_in.weight"], grads["norm_in.bias"] = _norm_grad(
                du, x, prm["norm_in.weight"], prm["norm_in.bias"], s["mean_in"], s["rstd_in"],
                cfg)
            dx = dx.to(x.dtype)
        return (None, dx, *(grads[n] if needs[n] else None for n in PARAMS))
