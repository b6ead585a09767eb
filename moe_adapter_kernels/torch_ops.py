"""Some of the Triton set's ops (``linear``, ``linear_dact``, ``input_grad``, ``gate_grad``,
``scaled_activation``; see their docstrings in ``moe_adapter_kernels.ops``) written as PyTorch
ops, with the same signatures and results up to rounding. The CUDA extension's op set uses
these; the Triton set runs its dense GEMMs (``linear``, ``linear_dact``) through them where the
tuned table says cuBLAS is the faster on this device and shape; the kernels benchmark times
them against the Triton kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference


def input_grad(norm_bwd, du_pairs, du_shared, dgates, dgates_out, dlogits_out, gates, ids,
               offsets, daux, aux_scale: float, w_gate, x, weight, bias, mean, rstd, kind: str):
    """(dx, dlogits, dweight, dbias) as ``ops.input_grad``, with ``norm_bwd`` the op set's
    norm backward (called on the fp32 du)."""
    T, N = x.shape
    dgates = dgates + dgates_out.float()
    if aux_scale:
        routed = (offsets[1:] - offsets[:-1]).float()
        dgates = dgates + (daux * aux_scale) * routed[ids.long()]
    dkept = gates * (dgates - (gates * dgates).sum(-1, keepdim=True))
    dlogits = dlogits_out.float().scatter_add(1, ids.long(), dkept)
    def empty():
        return x.new_empty(0, dtype=torch.float32)

    if du_pairs is None:
        return x.new_empty(0, N), dlogits, empty(), empty()
    du = du_pairs.view(T, ids.shape[1], N).sum(1, dtype=torch.float32)
    du = du + dlogits @ w_gate.float().t()
    if du_shared is not None:
        du = du + du_shared.float()
    if kind == "none":
        return du.to(x.dtype), dlogits, empty(), empty()
    dx, dw, db = norm_bwd(du, x, weight, bias, mean, rstd, kind)
    return (dx.to(x.dtype), dlogits, dw if weight is not None else empty(),
            db if bias is not None else empty())


def gate_grad(u, dlogits):
    """u^T @ dlogits [d, E] in fp32."""
    return u.float().t() @ dlogits


def scaled_activation(pre, activation: str, gates, sorted_pair):
    """gates[sorted_pair[r]] * act(pre[r]) [P, F] in pre.dtype."""
    h = reference.activation(pre, activation)
    if h is pre:  # identity: never scale the saved tensor in place
        h = h.clone()
    return h.mul_(gates.reshape(-1)[sorted_pair.long()][:, None])


def linear(a, w, activation: str, save_preact: bool = False, bias=None):
    """(act(a @ w + bias), a @ w + bias when ``save_preact`` else empty): the GEMM in cuBLAS,
    the activation in PyTorch ops (SwiGLU: w holds [gate | up])."""
    pre = a @ w if bias is None else torch.addmm(bias, a, w)
    out = reference.activation(pre, activation)
    if not save_preact:
        return out, a.new_empty(0)
    return (out.clone() if out is pre else out), pre  # an op's outputs may not alias


def linear_dact(dc, w, preact, activation: str):
    """d act(preact) given act(preact) @ w received dc: dc @ w^T in cuBLAS, then the
    activation's backward in PyTorch ops. [T, F] (SwiGLU: [T, 2F], gate half first)."""
    dh = dc @ w.t()
    if activation in ("identity", "none"):
        return dh
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(dh, preact)
    if activation == "silu":
        return torch.ops.aten.silu_backward(dh, preact)
    if activation != "swiglu":
        raise ValueError(f"torch_ops.linear_dact: unknown activation {activation!r}")
    gate, up = preact.chunk(2, dim=-1)
    return torch.cat([torch.ops.aten.silu_backward(dh * up, gate), dh * F.silu(gate)], dim=-1)
