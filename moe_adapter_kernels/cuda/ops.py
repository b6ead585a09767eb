"""The CUDA extension's ops under the names and signatures of the Triton ops in
``moe_adapter_kernels.ops`` (see their docstrings for shapes and dtypes), so the same autograd
wiring (``moe_adapter_kernels.autograd``) runs on either; plus the fake implementations torch.compile needs."""

from __future__ import annotations

import functools
import sys

import torch

from .. import torch_ops
from ..autograd import KERNELS
from . import load

load()  # registers torch.ops.moe_adapter_cuda
_C = torch.ops.moe_adapter_cuda
ROUTER_TOKENS = 32  # tokens per router block (csrc/kernels.h kRouterTokens)
# The shared MLP's dense GEMMs (forward, and dc @ W2^T before the activation's backward) go to
# cuBLAS with this backend (autograd._shared_mlp, _mlp_backward): they carry 2/3 of the
# adapter's FLOPs, and on an H100 cuBLAS ran them at ~730 TFLOP/s, our first (WMMA) kernel at
# ~135.
DENSE_VIA_CUBLAS = True


def route(u, w_gate, top_k: int):
    return _C.route(u, w_gate, top_k)


def permute(topk_ids, block_counts, block_gates, num_experts: int):
    return _C.permute(topk_ids, block_counts, block_gates, num_experts)


def norm(x, weight, bias, kind: str, eps: float):
    return _C.norm(x, weight, bias, kind, eps)


def norm_bwd(dy, x, weight, bias, mean, rstd, kind: str):
    return _C.norm_backward(dy, x, weight, bias, mean, rstd, kind)


def combine(y_pairs, shared, top_k: int, norm: str, weight, bias, eps: float,
            save_sum: bool = False):
    return _C.combine(y_pairs, shared, top_k, norm, weight, bias, eps, save_sum)


def expert_up(u, w1, sorted_pair, expert_offsets, top_k: int, activation: str,
              save_preact: bool = False, b1=None):
    return _C.grouped_gemm(u, w1, expert_offsets, sorted_pair, top_k, False, None, activation,
                           save_preact, b1)


def expert_down(h, w2, sorted_pair, expert_offsets, topk_weights, b2=None):
    return _C.grouped_gemm(h, w2, expert_offsets, sorted_pair, 0, True,
                           topk_weights.reshape(-1), "identity", False, b2)[0]


def linear(a, w, activation: str, save_preact: bool = False, bias=None):
    return _C.grouped_gemm(a, w, None, None, 0, False, None, activation, save_preact, bias)


def expert_dact(dz, w2, preact, sorted_pair, expert_offsets, topk_weights, top_k: int,
                activation: str):
    dpre, dgate = _C.grouped_dact(dz, w2, preact, activation, expert_offsets, sorted_pair, top_k,
                                  topk_weights.reshape(-1))
    return dpre, dgate.view(topk_weights.shape)


def linear_dact(dc, w, preact, activation: str):
    return _C.grouped_dact(dc, w, preact, activation, None, None, 0, None)[0]


def expert_dx(dpreact, w1, sorted_pair, expert_offsets):
    return _C.grouped_gemm(dpreact, w1.transpose(1, 2), expert_offsets, sorted_pair, 0, True,
                           None, "identity", False, None)[0]


def weight_grad_op(a, b, expert_offsets, sorted_pair, a_gather_div: int, b_gather_div: int,
                   scale, a_activation: str, bias_grad: bool = False):
    return _C.weight_grad(a, b, expert_offsets, sorted_pair, a_gather_div, b_gather_div, scale,
                          a_activation, bias_grad)


# the backward's elementwise steps: PyTorch ops in this set
input_grad = functools.partial(torch_ops.input_grad, norm_bwd)
gate_grad = torch_ops.gate_grad
scaled_activation = torch_ops.scaled_activation


def _fake(name):
    return torch.library.register_fake(f"moe_adapter_cuda::{name}")


@_fake("route")
def _(u, w_gate, top_k):
    T, E = u.shape[0], w_gate.shape[1]
    nb = (T + ROUTER_TOKENS - 1) // ROUTER_TOKENS
    return (u.new_empty(T, E, dtype=torch.float32), u.new_empty(T, top_k, dtype=torch.int32),
            u.new_empty(T, top_k, dtype=torch.float32), u.new_empty(nb, E, dtype=torch.int32),
            u.new_empty(nb, E, dtype=torch.float32))


@_fake("permute")
def _(topk_ids, block_counts, block_gates, num_experts):
    P = topk_ids.numel()
    return (topk_ids.new_empty(P), topk_ids.new_empty(P), topk_ids.new_empty(num_experts + 1),
            block_gates.new_empty(()))


@_fake("grouped_gemm")
def _(a, b, offsets, pair_ids, gather_div, scatter, scale, activation, save_preact, bias):
    nb = b.shape[-1]
    M = pair_ids.shape[0] if offsets is not None else a.shape[0]
    n = nb // 2 if activation == "swiglu" else nb
    return a.new_empty(M, n), a.new_empty(M, nb) if save_preact else a.new_empty(0)


@_fake("grouped_dact")
def _(dc, w, preact, activation, offsets, pair_ids, gather_div, gate):
    dgate = dc.new_empty(gate.numel(), dtype=torch.float32) if gate is not None else \
        dc.new_empty(0)
    return torch.empty_like(preact), dgate


@_fake("weight_grad")
def _(a, b, offsets, pair_ids, a_gather_div, b_gather_div, scale, a_activation, bias_grad):
    ka = a.shape[1] // 2 if a_activation == "swiglu" else a.shape[1]
    lead = () if offsets is None else (offsets.shape[0] - 1,)
    db = a.new_empty(*lead, b.shape[1]) if bias_grad else a.new_empty(0)
    return a.new_empty(*lead, ka, b.shape[1]), db


@_fake("norm")
def _(x, weight, bias, kind, eps):
    T = x.shape[0]
    return (torch.empty_like(x), x.new_empty(T, dtype=torch.float32),
            x.new_empty(T, dtype=torch.float32))


@_fake("norm_backward")
def _(dy, x, weight, bias, mean, rstd, kind):
    return (torch.empty_like(x), x.new_empty(0) if weight is None else torch.empty_like(weight),
            x.new_empty(0) if bias is None else torch.empty_like(bias))


@_fake("combine")
def _(y_pairs, shared, top_k, norm, weight, bias, eps, save_sum):
    T, N = y_pairs.shape[0] // top_k, y_pairs.shape[1]
    return (y_pairs.new_empty(T, N), y_pairs.new_empty(T, dtype=torch.float32),
            y_pairs.new_empty(T, dtype=torch.float32), y_pairs.new_empty(T if save_sum else 0, N))


KERNELS["cuda"] = sys.modules[__name__]
