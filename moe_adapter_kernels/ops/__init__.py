"""Triton kernels of the MoE-Adapter as functional ops, each registered with
``torch.library.custom_op`` (namespace ``moe_adapter``) with a fake implementation.

Pipeline (forward): ``norm`` -> ``route`` -> ``permute`` -> ``expert_up`` -> ``expert_down``
(``grouped_mlp`` = both) -> ``linear`` (shared MLP) -> ``combine``. See each op's docstring for
shapes and dtypes; floating inputs may be fp32, fp16 or bf16, accumulation is fp32.
"""

from .combine import combine
from .grouped_gemm import expert_down, expert_up, grouped_gemm, linear
from .moe import moe_adapter_forward
from .norm import norm
from .permute import permute
from .router import route


def grouped_mlp(u, w1, w2, sorted_pair, expert_offsets, topk_weights, top_k: int,
                activation: str = "silu"):
    """All routed experts: gate-weighted ``W2_e act(W1_e u)`` per (token, slot) pair, in pair
    order [T*k, N]. ``expert_up`` followed by ``expert_down``."""
    h = expert_up(u, w1, sorted_pair, expert_offsets, top_k, activation)
    return expert_down(h, w2, sorted_pair, expert_offsets, topk_weights)


__all__ = ["norm", "route", "permute", "expert_up", "expert_down", "grouped_mlp", "linear",
           "combine", "grouped_gemm", "moe_adapter_forward"]
