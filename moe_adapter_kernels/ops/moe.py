"""The fused MoE-Adapter forward used by the module's ``triton`` backend."""

from __future__ import annotations

import torch

from .. import reference
from ..config import MoEAdapterConfig
from .autograd import PARAMS, MoEAdapterFunction, fused_forward


def moe_adapter_forward(x: torch.Tensor, p: dict, cfg: MoEAdapterConfig):
    """MoE-Adapter with the Triton kernels; same contract as
    :func:`moe_adapter_kernels.reference.moe_adapter`: (y [T, d_out], routing, L_aux).

    Differentiable through :class:`MoEAdapterFunction` when autograd needs it; under
    ``torch.no_grad()`` (or with nothing requiring grad) nothing is saved for backward.
    Parameters are cast to x's dtype (autocast runs fp32 weights in bf16/fp16 this way).
    """
    if cfg.router_dtype != "float32":
        raise ValueError(f"router_dtype={cfg.router_dtype!r} is only supported by the torch "
                         "backend; the Triton router computes in float32")
    x = x.contiguous()
    params = [None if p.get(n) is None else p[n].to(x.dtype) for n in PARAMS]
    if torch.is_grad_enabled() and (x.requires_grad or any(
            t is not None and t.requires_grad for t in params)):
        y, logits, gates, ids = MoEAdapterFunction.apply(cfg, x, *params)
    else:
        y, logits, gates, ids, _ = fused_forward(cfg, x, dict(zip(PARAMS, params)), save=False)
    routing = reference.Routing(logits, ids, gates)
    return y, routing, reference.aux_loss(routing, cfg.num_experts, cfg.aux_loss_variant)
