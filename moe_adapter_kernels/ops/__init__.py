"""Triton kernels of the MoE-Adapter as functional ops, each registered with
``torch.library.custom_op`` (namespace ``moe_adapter``) with a fake implementation. Importing
this package registers them as the ``"triton"`` op set of the autograd wiring
(``moe_adapter_kernels.autograd``).

Forward: ``norm`` -> ``route`` -> ``permute`` -> ``expert_up`` -> ``expert_down``
(``grouped_mlp`` = both) -> ``linear`` (shared MLP) -> ``combine``. Backward (wired in
``moe_adapter_kernels.autograd``): ``norm_bwd``, ``expert_dact`` / ``linear_dact`` (GEMM into the
pre-activation with the activation derivative and gate gradient fused), ``scaled_activation``
(g * act(pre) for dW2), ``weight_grad`` (per-expert dW over variable-length row ranges),
``expert_dx``, ``input_grad`` (router softmax backward, sum over the k slots and the input
norm's backward in one pass) and ``gate_grad`` (the router's weight gradient). See each op's
docstring for shapes and dtypes; floating inputs may be fp32, fp16 or bf16, accumulation is
fp32.
"""

import types

from ..autograd import EAGER_KERNELS, KERNELS, MoEAdapterFunction, moe_adapter_forward
from .combine import combine
from .grouped_gemm import (expert_dact, expert_down, expert_dx, expert_up, grouped_dact,
                           grouped_gemm, linear, linear_dact)
from .input_grad import input_grad
from .norm import norm, norm_bwd
from .permute import permute
from .router import gate_grad, route
from .scaled_activation import scaled_activation
from .weight_grad import weight_grad, weight_grad_op

KERNELS["triton"] = types.SimpleNamespace(
    norm=norm, norm_bwd=norm_bwd, route=route, permute=permute, expert_up=expert_up,
    expert_down=expert_down, linear=linear, combine=combine, expert_dact=expert_dact,
    linear_dact=linear_dact, expert_dx=expert_dx, weight_grad_op=weight_grad_op,
    scaled_activation=scaled_activation, input_grad=input_grad, gate_grad=gate_grad)
EAGER_KERNELS["triton"] = types.SimpleNamespace(
    **{name: op.eager for name, op in vars(KERNELS["triton"]).items()})


def grouped_mlp(u, w1, w2, sorted_pair, expert_offsets, topk_weights, top_k: int,
                activation: str = "silu"):
    """All routed experts: gate-weighted ``W2_e act(W1_e u)`` per (token, slot) pair, in pair
    order [T*k, N]. ``expert_up`` followed by ``expert_down``."""
    h, _ = expert_up(u, w1, sorted_pair, expert_offsets, top_k, activation)
    return expert_down(h, w2, sorted_pair, expert_offsets, topk_weights)


__all__ = ["norm", "route", "permute", "expert_up", "expert_down", "grouped_mlp", "linear",
           "combine", "norm_bwd", "expert_dact", "linear_dact", "expert_dx", "weight_grad_op",
           "scaled_activation", "input_grad", "gate_grad",
           "grouped_gemm", "grouped_dact", "weight_grad", "moe_adapter_forward",
           "MoEAdapterFunction"]
