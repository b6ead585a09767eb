"""Autograd wiring of the fused MoE-Adapter: one ``torch.autograd.Function`` whose forward and
backward are sequences of registered ops (``moe_adapter::*`` Triton ops, or the CUDA
extension's ``moe_adapter_cuda::*``), and, in eager training, a small node per large weight
that computes that weight's gradient after it (:class:`DeferredWeightGrad`: lower peak memory).

Saved for backward (the fewest tensors that avoid a second forward through the GEMMs):
- x and the input norm's mean/rstd: u = N(x) is recomputed (one cheap pass) instead of kept;
- the routing (topk ids and weights, sorted pair ids, expert offsets): a few ints per pair;
- the routed up-projection's pre-activation [T*k, F'] (sorted): the activation, its derivative
  and the hidden h are recomputed from it inside the backward kernels, so h is never stored;
- shared topology: the shared MLP's pre-activation [T, S] and the final norm's input z [T, D];
- post topology: the middle norm's input [T, d_in], the aggregation MLP's pre-activation [T, S]
  and the final norm's input [T, D].
The aux loss L_aux (top-k variant) comes out of the permutation's scan and is an output of
this Function: its gradient, E * f_e / T for each gate routed to expert e, is added in the
backward from the saved expert offsets. (The ``softmax`` variant is computed outside, in
PyTorch, from the returned logits; its gradient flows back through them.)

The same wiring runs the Triton ops (``KERNELS["triton"]``) or the CUDA C++ extension's ops
(``KERNELS["cuda"]``, added by ``moe_adapter_kernels.cuda.ops`` when it loads): both sets have
the same names and signatures.

Both backward passes are first-order: under ``create_graph=True`` their gradients carry a
graph that raises when differentiated (:func:`first_order`), never a silent constant.
"""

from __future__ import annotations

import functools
import importlib

import torch

from . import reference, torch_ops
from .config import MoEAdapterConfig

# Op sets by backend name; the modules in OP_SET_MODULES add them when imported (op_set
# imports them on first use). EAGER_KERNELS holds, where a set has them, the same ops' plain
# Python bodies, used outside torch.compile.
KERNELS: dict = {}
EAGER_KERNELS: dict = {}
OP_SET_MODULES = {"triton": "moe_adapter_kernels.ops", "cuda": "moe_adapter_kernels.cuda.ops"}

PARAMS = ("w_gate", "w1", "b1", "w2", "b2", "shared_w1", "shared_b1", "shared_w2", "shared_b2",
          "norm_in.weight", "norm_in.bias", "norm_mid.weight", "norm_mid.bias",
          "norm_out.weight", "norm_out.bias")


def op_set(kernels: str):
    """The ops of backend ``kernels``: the registered custom ops while torch.compile traces
    (they are what it can see through), else their eager bodies when the set has them."""
    if kernels not in KERNELS:
        importlib.import_module(OP_SET_MODULES[kernels])  # registers the set
    if not torch.compiler.is_compiling() and kernels in EAGER_KERNELS:
        return EAGER_KERNELS[kernels]
    return KERNELS[kernels]


def _norm(kn, x, prm, pos, cfg):
    """(N(x), mean, rstd) for the norm at ``pos``; identity with empty statistics if off."""
    kind = cfg.norm_at(pos)
    if kind == "none":
        return x, x.new_empty(0), x.new_empty(0)
    return kn.norm(x, prm[f"norm_{pos}.weight"], prm[f"norm_{pos}.bias"], kind, cfg.norm_eps)


def _norm_grad(kn, dy, x, prm, pos, mean, rstd, cfg, grads):
    """dx of the norm at ``pos``; its weight and bias gradients go into ``grads``."""
    kind = cfg.norm_at(pos)
    if kind == "none":
        return dy
    w, b = prm[f"norm_{pos}.weight"], prm[f"norm_{pos}.bias"]
    dx, dw, db = kn.norm_bwd(dy, x, w, b, mean, rstd, kind)
    grads[f"norm_{pos}.weight"] = dw
    grads[f"norm_{pos}.bias"] = db if b is not None else None
    return dx


def _dense(kn):
    """Where the shared MLP's ``linear`` / ``linear_dact`` come from: the op set, or cuBLAS +
    PyTorch ops (``torch_ops``) where the set says its own dense GEMM is the slower
    (``DENSE_VIA_CUBLAS``)."""
    return torch_ops if getattr(kn, "DENSE_VIA_CUBLAS", False) else kn


def _shared_mlp(kn, a, prm, cfg, save):
    """(S(a), pre-activation) of the shared / aggregation MLP, its GEMMs from :func:`_dense`
    (the activation fused into the first)."""
    linear = _dense(kn).linear
    h, pre = linear(a, prm["shared_w1"], cfg.shared_activation, save, prm["shared_b1"])
    return linear(h, prm["shared_w2"], "identity", False, prm["shared_b2"])[0], pre


def fused_forward(cfg: MoEAdapterConfig, x, prm: dict, save: bool, kernels: str):
    """The forward pipeline on x [T, d_in] with the ``kernels`` op set. Returns (y, logits,
    topk_weights, topk_ids, L_aux, saved) where saved holds what the backward needs (empty
    when ``save`` is False)."""
    kn = op_set(kernels)
    k = cfg.top_k
    u, mean_in, rstd_in = _norm(kn, x, prm, "in", cfg)
    logits, ids, gates, block_counts, block_gates = kn.route(u, prm["w_gate"], k)
    sorted_pair, _, offsets, aux = kn.permute(ids, block_counts, block_gates, cfg.num_experts)
    h, pre1 = kn.expert_up(u, prm["w1"], sorted_pair, offsets, k, cfg.expert_activation, save,
                        prm["b1"])
    y_pairs = kn.expert_down(h, prm["w2"], sorted_pair, offsets, gates, prm["b2"])
    del h
    saved = dict(mean_in=mean_in, rstd_in=rstd_in, ids=ids, gates=gates,
                 sorted_pair=sorted_pair, offsets=offsets, pre1=pre1)
    out = cfg.norm_at("out")
    w_out, b_out = prm["norm_out.weight"], prm["norm_out.bias"]
    if cfg.topology == "shared":
        shared, pre_s = (None, None) if not cfg.shared_dim else _shared_mlp(kn, u, prm, cfg,
                                                                            save)
        y, mean_out, rstd_out, z = kn.combine(y_pairs, shared, k, out, w_out, b_out, cfg.norm_eps,
                                           save)
    else:
        hm, mean_mid, rstd_mid, zm = kn.combine(y_pairs, None, k, cfg.norm_at("mid"),
                                             prm["norm_mid.weight"], prm["norm_mid.bias"],
                                             cfg.norm_eps, save)
        z, pre_s = _shared_mlp(kn, hm, prm, cfg, save)
        y, mean_out, rstd_out = _norm(kn, z, prm, "out", cfg)
        saved.update(zm=zm, mean_mid=mean_mid, rstd_mid=rstd_mid)
    saved.update(pre_s=pre_s, z=z, mean_out=mean_out, rstd_out=rstd_out)
    return y, logits, gates, ids, aux, (saved if save else {})


def _routed_dact(kn, cfg, dz, prm, s):
    """(dpre1, dgates): the routed experts' activation backward given dz, the gradient of their
    gate-weighted sum: dpre1 [T*k, F'] the gradient of the saved pre-activation (sorted
    rows), dgates [T, k] fp32 the gate gradient."""
    dpre1, dgates = kn.expert_dact(dz, prm["w2"], s["pre1"], s["sorted_pair"], s["offsets"],
                                   s["gates"], cfg.top_k, cfg.expert_activation)
    if prm["b2"] is not None:  # each slot's output also carries its expert's b2
        dgates = dgates + (dz.float() @ prm["b2"].float().t()).gather(1, s["ids"].long())
    return dpre1, dgates


def _routed_w2_grads(kn, cfg, dz, pre1, sp, off, gates):
    """(dW2, db2) of the routed experts, from dz and the saved pre-activation.

    dW2 is computed from g * act(pre), recomputed in one elementwise pass: computing the
    activation and scale inside the weight-gradient GEMM's loop halved its speed (GPU session
    2: 193 vs 397 TFLOP/s). With biases the bias gradient needs the scaled rows of dz, so that
    case keeps the fused kernel."""
    k, act = cfg.top_k, cfg.expert_activation
    if cfg.bias:
        return kn.weight_grad_op(pre1, dz, off, sp, 0, k, gates.reshape(-1), act, True)
    h = kn.scaled_activation(pre1, act, gates, sp)
    return kn.weight_grad_op(h, dz, off, sp, 0, k, None, "identity")[0], None


def _linear_grads(a, dout, need_w, need_b):
    """(a^T @ dout, column sums of dout): the weight and bias gradients of a linear layer."""
    return (a.t() @ dout if need_w else None,
            dout.sum(0, dtype=torch.float32).to(dout.dtype) if need_b else None)


def _shared_w2_grads(pre, act, dc, need_w, need_b):
    """The shared MLP's second linear layer's gradients; its input act(pre) is recomputed."""
    return _linear_grads(reference.activation(pre, act) if need_w else None, dc, need_w, need_b)


def _mlp_backward(kn, dc, a, pre, prm, cfg, grads, need_a):
    """Gradients of the shared / aggregation MLP c = act(a @ W1 + b1) @ W2 + b2 given dc.

    Only dc @ W2^T with the activation's backward fused runs in our kernels (from
    :func:`_dense`; in cuBLAS, then the activation's backward in PyTorch ops, where the op set
    or the tuned table says cuBLAS is the faster for this shape); the other dense GEMMs go to
    cuBLAS (torch.matmul), which the issue allows for the shared expert and which ran them at
    ~730 TFLOP/s against our kernels' 370-445 (H100, GPU session 2). The hidden act(pre) for
    dW2 is recomputed after dpre is freed, so the peak memory does not grow."""
    act, needs = cfg.shared_activation, grads.needs
    dpre = _dense(kn).linear_dact(dc, prm["shared_w2"], pre, act)
    grads.compute(("shared_w1", "shared_b1"), _linear_grads, a, dpre, needs["shared_w1"],
                  needs["shared_b1"])
    da = dpre @ prm["shared_w1"].t() if need_a else None
    del dpre
    grads.compute(("shared_w2", "shared_b2"), _shared_w2_grads, pre, act, dc,
                  needs["shared_w2"], needs["shared_b2"])
    return da


class FirstOrderOnly(torch.autograd.Function):
    """``FirstOrderOnly.apply(kernels, *grads)``: the gradients a fused backward returns under
    ``create_graph=True``, each given a graph whose backward raises. The kernels have no second
    derivative; gradients without a graph would silently count as constants in what is built
    from them (a gradient penalty, say), so differentiating them is an error instead."""

    @staticmethod
    def forward(ctx, kernels, *grads):
        ctx.kernels = kernels
        return tuple(None if g is None else g.detach() for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"moe_adapter_kernels: the {ctx.kernels} backend's backward is first-order only, so "
            "its gradients cannot be differentiated (create_graph=True through the adapter: "
            "gradient penalties, higher-order methods); use MoEAdapter(..., backend='torch') "
            "for that")


def first_order(backward):
    """Decorates a fused backward: under ``create_graph=True`` it runs without building a
    graph and its gradients go through :class:`FirstOrderOnly`; otherwise it runs as is."""

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return backward(ctx, *grad_outputs)
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        return FirstOrderOnly.apply(ctx.kernels, *(
            g.detach().requires_grad_() if isinstance(g, torch.Tensor) else g for g in grads))

    return wrapper


# The four large weights' gradients (with their biases), in the order their deferred nodes
# run: each frees its inputs (dpre of the shared MLP first, the largest) before the next.
WEIGHT_GROUPS = (("shared_w1", "shared_b1"), ("w1", "b1"), ("shared_w2", "shared_b2"),
                 ("w2", "b2"))

# Whether a training forward gives each weight group its own autograd node (see
# :class:`DeferredWeightGrad`); False: MoEAdapterFunction returns all gradients itself.
DEFER_WEIGHT_GRADS = True


class Deferred:
    """What MoEAdapterFunction's backward leaves to the DeferredWeightGrad nodes of one
    forward: ``work`` (per group, the call that computes its gradients, holding just the
    tensors it reads) and ``live`` (the groups whose node runs in the current backward). The
    nodes themselves say which group they stand for and which of its tensors need a gradient
    (``group``, ``needs_input_grad``)."""

    def __init__(self):
        self.work, self.live = {}, set()


class DeferredWeightGrad(torch.autograd.Function):
    """One autograd node per weight group: ``link = DeferredWeightGrad.apply(kernels, deferred,
    group, w, b)`` (an empty tensor) goes into MoEAdapterFunction in place of the weight's gradient
    path, so the engine runs this node after that backward and, before the next such node,
    hands its gradient to autograd (``.grad`` or the cast node under autocast). A single node
    would return the four weight gradients at once (94.4M parameters, 180 MiB in bf16): the
    peak of a step at small T, above the dense adapter's, whose two linear layers hand theirs
    over one at a time (paper preset, bf16, ``benchmarks.memory``: 0.58 / 0.61 / 0.64 of the
    dense adapter's peak at T = 512 / 2048 / 8192 with these nodes, 1.39 / 0.82 / 0.67 without).
    The engine runs the node created last first, so the caller creates them in the reverse of
    :data:`WEIGHT_GROUPS`, each right after its weights' cast (under autocast the cast's node
    then runs before the next group's). Not used under torch.compile (Python-side state)."""

    @staticmethod
    def forward(ctx, kernels, deferred, group, *tensors):
        ctx.kernels, ctx.deferred, ctx.group = kernels, deferred, group
        return tensors[0].new_empty(0)

    @staticmethod
    @first_order
    def backward(ctx, _):
        work = ctx.deferred.work.pop(ctx.group, None)
        if work is None:
            raise RuntimeError(f"moe_adapter_kernels: no deferred gradient for {ctx.group}; "
                               "MoEAdapterFunction's backward did not run first")
        grads = work()
        return (None, None, None, *(g if need else None
                                    for g, need in zip(grads, ctx.needs_input_grad[3:])))


class WeightGrads(dict):
    """The gradients of one backward by parameter name, and ``needs``, which of them autograd
    wants. ``compute(group, fn, *args)`` stores fn(*args)'s gradients of that group, or, when
    the group has a DeferredWeightGrad node in this backward, leaves the call to it."""

    def __init__(self, needs, deferred):
        super().__init__(dict.fromkeys(PARAMS))
        self.needs, self.deferred = needs, deferred

    def compute(self, group, fn, *args):
        if not any(self.needs[n] for n in group):
            return
        if self.deferred is not None and group in self.deferred.live:
            self.deferred.work[group] = functools.partial(fn, *args)
        else:
            self.update(zip(group, fn(*args)))


class MoEAdapterFunction(torch.autograd.Function):
    """y, logits, topk_weights, topk_ids, L_aux = MoEAdapterFunction.apply(cfg, kernels,
    deferred, x, *params, *links)
    with ``kernels`` a key of :data:`KERNELS`, params in the order of :data:`PARAMS` (None
    where the config has none), and ``deferred`` None or the :class:`Deferred` whose
    DeferredWeightGrad nodes made ``links`` (the groups they stand for are passed detached).

    The backward's order is chosen for its peak memory: output norm, shared MLP, the routed
    activation backward, the routed experts' input gradient per (token, slot) pair, input_grad
    (the sum over the k slots, the router and the input norm: dx), and only then the gate and
    routed weight gradients. So the per-pair input gradients [T*k, d], the largest temporary,
    are freed before dW1, dW2 and dW2's g*act(pre) are allocated (paper preset, estimated with
    ``benchmarks.memory``: 344 -> 294 MiB at T = 2048, 837 -> 798 MiB at T = 8192). With
    deferred groups their weight GEMMs run in those nodes instead, after this one returns."""

    @staticmethod
    def forward(ctx, cfg, kernels, deferred, x, *tensors):
        params = tensors[:len(PARAMS)]
        y, logits, gates, ids, aux, saved = fused_forward(cfg, x, dict(zip(PARAMS, params)),
                                                          True, kernels)
        ctx.cfg, ctx.kernels, ctx.deferred = cfg, kernels, deferred
        ctx.links = [link.grad_fn for link in tensors[len(PARAMS):]]
        ctx.names = list(saved)
        ctx.save_for_backward(x, *params, *saved.values())
        ctx.mark_non_differentiable(ids)
        return y, logits, gates, ids, aux

    @staticmethod
    @first_order
    def backward(ctx, dy, dlogits, dgates_out, _, daux):
        cfg, kn, deferred = ctx.cfg, op_set(ctx.kernels), ctx.deferred
        tensors = ctx.saved_tensors
        x = tensors[0]
        prm = dict(zip(PARAMS, tensors[1:1 + len(PARAMS)]))
        s = dict(zip(ctx.names, tensors[1 + len(PARAMS):]))
        needs = dict(zip(("x",) + PARAMS, ctx.needs_input_grad[3:]))
        if deferred is not None:
            live = [node for node in ctx.links if _will_run(node)]
            deferred.live = {node.group for node in live}
            for node in live:
                needs.update(zip(node.group, node.needs_input_grad[3:]))
        need_u = needs["x"] or needs["norm_in.weight"] or needs["norm_in.bias"]
        grads = WeightGrads(needs, deferred)
        u = _norm(kn, x, prm, "in", cfg)[0]

        dz = _norm_grad(kn, dy.contiguous(), s["z"], prm, "out", s["mean_out"], s["rstd_out"], cfg,
                        grads)
        du_shared = None
        if cfg.topology == "shared":
            dz_routed = dz
            if cfg.shared_dim:
                du_shared = _mlp_backward(kn, dz, u, s["pre_s"], prm, cfg, grads, need_u)
        else:
            hm = _norm(kn, s["zm"], prm, "mid", cfg)[0]
            dhm = _mlp_backward(kn, dz, hm, s["pre_s"], prm, cfg, grads, True)
            del hm
            dz_routed = _norm_grad(kn, dhm, s["zm"], prm, "mid", s["mean_mid"], s["rstd_mid"], cfg,
                                   grads)
            del dhm
        del dz
        dz_routed = dz_routed.contiguous()
        dpre1, dgates = _routed_dact(kn, cfg, dz_routed, prm, s)
        sp, off = s["sorted_pair"], s["offsets"]
        # the routed experts' input gradient per (token, slot) pair; input_grad sums the k slots
        du_pairs = kn.expert_dx(dpre1, prm["w1"], sp, off) if need_u else None
        T = x.shape[0]
        # L_aux = E / T^2 * sum_e (sum of e's gates) * (pairs routed to e)
        aux_scale = cfg.num_experts / (T * T) if T and cfg.aux_loss_variant == "topk" else 0.0
        kind = cfg.norm_at("in")
        dx, dlogits, dnw, dnb = kn.input_grad(
            du_pairs, du_shared, dgates, dgates_out, dlogits, s["gates"], s["ids"], off,
            daux, aux_scale, prm["w_gate"], x, prm["norm_in.weight"], prm["norm_in.bias"],
            s["mean_in"], s["rstd_in"], kind)
        del du_pairs, du_shared  # freed before the weight gradients: see the class docstring
        if needs["w_gate"]:
            grads["w_gate"] = kn.gate_grad(u, dlogits).to(prm["w_gate"].dtype)
        grads.compute(("w1", "b1"), kn.weight_grad_op, u, dpre1, off, sp, cfg.top_k, 0, None,
                      "identity", cfg.bias)
        del u, dpre1
        grads.compute(("w2", "b2"), _routed_w2_grads, kn, cfg, dz_routed, s["pre1"], sp, off,
                      s["gates"])
        grads["norm_in.weight"], grads["norm_in.bias"] = dnw, dnb  # returned only if needed
        dx = dx if need_u else None
        links = [x.new_empty(0) for _ in ctx.links]
        return (None, None, None, dx,
                *(grads[n] if ctx.needs_input_grad[4 + i] else None
                  for i, n in enumerate(PARAMS)), *links)


def _will_run(node) -> bool:
    """Whether the running backward executes ``node`` (a torch.autograd.grad that asks for
    other inputs only does not run the deferred weight gradients' nodes)."""
    will_run = getattr(torch._C, "_will_engine_execute_node", None)
    return True if will_run is None else will_run(node)


def _defer(group, tensors, T: int) -> bool:
    """Whether weight group ``group`` (its tensors, after the cast) gets a DeferredWeightGrad
    node for a batch of T tokens. Not when nothing in it needs a gradient, nor for the shared
    MLP's first layer when T >= its input width: its node would keep dpre [T, S] alive
    through the rest of the backward, where computing dW1 [d, S] at once frees dpre (paper
    preset, ``benchmarks.memory``: 758 vs 868 MiB at T = 8192; 217 vs 227 at T = 2048)."""
    if not any(t is not None and t.requires_grad for t in tensors):
        return False
    return group[0] != "shared_w1" or T < tensors[0].shape[0]


def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def moe_adapter_forward(x: torch.Tensor, p: dict, cfg: MoEAdapterConfig, kernels: str):
    """MoE-Adapter with a fused op set (``kernels``: ``"triton"`` or ``"cuda"``, see
    :data:`KERNELS`); same contract as
    :func:`moe_adapter_kernels.reference.moe_adapter`: (y [T, d_out], routing, L_aux).

    Differentiable through :class:`MoEAdapterFunction` when autograd needs it; under
    ``torch.no_grad()`` (or with nothing requiring grad) nothing is saved for backward.
    Parameters are cast to x's dtype (autocast runs fp32 weights in bf16/fp16 this way).
    Outside torch.compile the weight groups that need gradients get DeferredWeightGrad nodes
    (:data:`DEFER_WEIGHT_GRADS`).
    """
    if cfg.router_dtype != "float32":
        raise ValueError(f"router_dtype={cfg.router_dtype!r} is only supported by the torch "
                         "backend; the fused router computes in float32")
    x = x.contiguous()
    prm = {n: p.get(n) for n in PARAMS}
    train = torch.is_grad_enabled() and (x.requires_grad or any(
        t is not None and t.requires_grad for t in prm.values()))
    deferred, links = None, []
    if train and DEFER_WEIGHT_GRADS and not torch.compiler.is_compiling():
        deferred = Deferred()
        for group in reversed(WEIGHT_GROUPS):  # the node created last runs first
            ts = [_cast(prm[n], x.dtype) for n in group]  # each group's cast before its node
            prm.update(zip(group, ts))
            if _defer(group, ts, x.shape[0]):
                links.append(DeferredWeightGrad.apply(kernels, deferred, group, *ts))
                prm.update((n, None if t is None else t.detach()) for n, t in zip(group, ts))
        deferred = deferred if links else None
    prm = {n: _cast(t, x.dtype) for n, t in prm.items()}  # the rest (the groups' are done)
    if train:
        y, logits, gates, ids, aux = MoEAdapterFunction.apply(
            cfg, kernels, deferred, x, *prm.values(), *links)
    else:
        y, logits, gates, ids, aux, _ = fused_forward(cfg, x, prm, False, kernels)
    routing = reference.Routing(logits, ids, gates)
    if cfg.aux_loss_variant != "topk":
        aux = reference.aux_loss(routing, cfg.num_experts, cfg.aux_loss_variant)
    return y, routing, aux
