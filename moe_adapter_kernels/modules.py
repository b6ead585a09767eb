"""Drop-in ``nn.Module``s: MoEAdapter, DenseAdapter, FeatureFusion, and backend dispatch.

Each module takes ``[..., d_in]`` and returns a plain tensor ``[..., d_out]``, so it can replace
an existing projector. Parameters have one layout for every backend (see ``config``), so a
checkpoint written with one backend loads into another.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from . import backends, reference
from .autograd import PARAMS, moe_adapter_forward
from .config import DenseAdapterConfig, FeatureFusionConfig, MoEAdapterConfig

log = logging.getLogger("moe_adapter_kernels")


class Norm(nn.Module):
    """LayerNorm (weight, bias), RMSNorm (weight) or identity, as chosen by ``kind``."""

    def __init__(self, dim: int, kind: str, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim)) if kind != "none" else None
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def forward(self, x):
        return reference.norm(x, self.kind, self.weight, self.bias, self.eps)


def _linear_init(*shape: int, fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


def check_input(x, d_in: int, ref: torch.Tensor, what: str) -> None:
    """Raise a clear TypeError/ValueError when x cannot be fed to a module whose first weight
    is ``ref``. Values are not inspected: non-finite inputs give non-finite outputs."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point input, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != d_in:
        raise ValueError(f"{what}: expected input of shape [..., {d_in}], got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{what}: input is on {x.device} but the weights are on {ref.device}; "
                         f"move one of them (e.g. module.to(x.device))")
    if x.dtype != ref.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{what}: input dtype {x.dtype} does not match the weights' {ref.dtype}; "
                        f"cast one of them or run under torch.autocast")


DENSE_PARAMS = ("w1", "w2", "norm_in.weight", "norm_in.bias", "norm_out.weight", "norm_out.bias")


def _weights(module: nn.Module, names: tuple[str, ...]) -> dict:
    """The weights ``names`` ("w1", "norm_in.weight", ...) that the functional forward reads;
    absent ones are left out. A parametrized weight (torch.nn.utils.parametrize) arrives as
    the tensor its parametrization computes, as nn.Linear would use it. Read off the modules'
    parameter dicts: ~3x cheaper than ``dict(named_parameters())``, and small eager batches
    feel the host time."""
    p = {}
    for name in names:
        owner, _, attr = name.rpartition(".")
        m = module._modules.get(owner) if owner else module
        if m is None:
            continue
        t = m._parameters.get(attr)
        if t is None:
            par = m._modules.get("parametrizations")
            if par is not None and attr in par:
                t = getattr(m, attr)
        if t is not None:
            p[name] = t
    return p


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class MoEAdapter(nn.Module):
    """The sparse MoE-Adapter (paper eqs. 2-5). ``y = adapter(x)``: ``[..., d_in] -> [...,
    d_out]``. After each forward, ``aux_loss`` holds ``aux_loss_coef * L_aux`` (differentiable;
    add it to the task loss) and ``routing_stats()`` the detached routing statistics.

    ``backend``: ``"auto"`` (Triton on CUDA tensors when available, else PyTorch), ``"triton"``,
    ``"cuda"`` or ``"torch"``; ``backend_used`` says what ran last.
    """

    def __init__(self, config: MoEAdapterConfig | None = None, backend: str = "auto"):
        super().__init__()
        cfg = config if config is not None else MoEAdapterConfig.paper()
        if not isinstance(cfg, MoEAdapterConfig):
            raise TypeError(f"config: expected a MoEAdapterConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.backend = backends.check_backend(backend)
        self.backend_used: str | None = None
        E, d, F = cfg.num_experts, cfg.d_in, cfg.expert_dim
        self.norm_in = Norm(d, cfg.norm_at("in"), cfg.norm_eps)
        self.w_gate = _linear_init(d, E, fan_in=d)
        self.w1 = _linear_init(E, d, cfg.expert_up, fan_in=d)
        self.w2 = _linear_init(E, F, cfg.expert_out, fan_in=F)
        if cfg.bias:
            self.b1 = _linear_init(E, cfg.expert_up, fan_in=d)
            self.b2 = _linear_init(E, cfg.expert_out, fan_in=F)
        if cfg.shared_dim:
            self.shared_w1 = _linear_init(d, cfg.shared_dim, fan_in=d)
            self.shared_w2 = _linear_init(cfg.shared_dim, cfg.d_out, fan_in=cfg.shared_dim)
            if cfg.bias:
                self.shared_b1 = _linear_init(cfg.shared_dim, fan_in=d)
                self.shared_b2 = _linear_init(cfg.d_out, fan_in=cfg.shared_dim)
        if cfg.topology == "post":
            self.norm_mid = Norm(d, cfg.norm_at("mid"), cfg.norm_eps)
        self.norm_out = Norm(cfg.d_out, cfg.norm_at("out"), cfg.norm_eps)
        self.aux_loss: torch.Tensor | None = None
        self._routing: reference.Routing | None = None
        self._l_aux: torch.Tensor | None = None

    def __getstate__(self):
        """Copies and pickles hold ``aux_loss`` without its autograd graph: copy.deepcopy
        fails on a module holding a non-leaf tensor (an EMA copy taken mid-training)."""
        state = super().__getstate__()
        if state.get("aux_loss") is not None:
            state["aux_loss"] = state["aux_loss"].detach()
        return state

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_in={c.d_in}, d_out={c.d_out}, experts={c.num_experts}, top_k={c.top_k}, "
                f"expert_dim={c.expert_dim}, shared_dim={c.shared_dim}, topology={c.topology}, "
                f"activation={c.expert_activation}, norm={c.norm}, backend={self.backend}")

    def parameter_counts(self) -> dict:
        """Total and per-token active parameters, counted on this module's tensors."""
        total = sum(p.numel() for p in self.parameters())
        routed = [self.w1, self.w2] + ([self.b1, self.b2] if self.config.bias else [])
        per_expert = sum(p.numel() for p in routed) // self.config.num_experts
        inactive = (self.config.num_experts - self.config.top_k) * per_expert
        return {"total": total, "active": total - inactive}

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token."""
        return self.config.flops_per_token()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Release the previous step's autograd graph (held by aux_loss) before any op on x or
        # the parameters: else their gradient-accumulation nodes outlive every step, keeping
        # the stream they were created on, and a CUDA graph capture after an eager step fails.
        self.aux_loss = None
        cfg = self.config
        check_input(x, cfg.d_in, self.w_gate, "MoEAdapter")
        lead = x.shape[:-1]
        x2 = _autocast_input(x).reshape(-1, cfg.d_in)
        fused_ok = x2.dtype in backends.FUSED_DTYPES and cfg.router_dtype == "float32"
        backend = backends.resolve(self.backend, x2.device, tuple(_MOE_IMPLS), fused_ok)
        if backend != self.backend_used:
            if not torch.compiler.is_compiling():  # dynamo cannot trace logging calls
                log.debug("MoEAdapter runs on backend %r", backend)
            self.backend_used = backend
        y, routing, l_aux = _MOE_IMPLS[backend](x2, _weights(self, PARAMS), cfg)
        self.aux_loss = cfg.aux_loss_coef * l_aux
        self._routing = reference.Routing(*(t.detach() for t in routing))
        self._l_aux = l_aux.detach()
        return y.reshape(*lead, cfg.d_out)

    def routing_stats(self) -> reference.RoutingStats:
        """Per-expert (token, slot) counts, mean gate probabilities and the unscaled L_aux of
        the last forward."""
        if self._routing is None:
            raise RuntimeError("routing_stats(): run a forward pass first")
        return reference.routing_stats(self._routing, self.config.num_experts, self._l_aux)


def _triton_forward(x, p, cfg):
    from . import ops  # noqa: F401  imports triton (only when this backend runs); registers it
    return moe_adapter_forward(x, p, cfg, kernels="triton")


def _cuda_forward(x, p, cfg):
    from .cuda import ops  # noqa: F401  loads the extension; registers its op set
    return moe_adapter_forward(x, p, cfg, kernels="cuda")


_MOE_IMPLS = {"torch": reference.moe_adapter, "triton": _triton_forward, "cuda": _cuda_forward}


class DenseAdapter(nn.Module):
    """The dense baseline (paper eq. 1): ``y = N(W2 SiLU(W1 N(x)))``, 94.4M parameters."""

    def __init__(self, config: DenseAdapterConfig | None = None):
        super().__init__()
        cfg = config if config is not None else DenseAdapterConfig.paper()
        if not isinstance(cfg, DenseAdapterConfig):
            raise TypeError(f"config: expected a DenseAdapterConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.norm_in = Norm(cfg.d_in, cfg.norm, cfg.norm_eps)
        self.w1 = _linear_init(cfg.d_in, cfg.hidden_dim, fan_in=cfg.d_in)
        self.w2 = _linear_init(cfg.hidden_dim, cfg.d_out, fan_in=cfg.hidden_dim)
        self.norm_out = Norm(cfg.d_out, cfg.norm, cfg.norm_eps)

    def parameter_counts(self) -> dict:
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "active": total}

    def flops_per_token(self) -> int:
        return self.config.flops_per_token()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        check_input(x, cfg.d_in, self.w1, "DenseAdapter")
        x = _autocast_input(x)
        return reference.dense_adapter(x, _weights(self, DENSE_PARAMS), cfg.norm,
                                       cfg.norm_eps)


class FeatureFusion(nn.Module):
    """Front end (Table 4 I): ``N(SiLU(W_f N(x_enc)))`` plus, when ``tokens`` are given, their
    embeddings (Kimi-Audio dual stream). ``x_enc``: ``[..., d_enc]``; tokens: ``[...]`` int."""

    def __init__(self, config: FeatureFusionConfig | None = None):
        super().__init__()
        cfg = config if config is not None else FeatureFusionConfig()
        self.config = cfg
        self.norm_in = Norm(cfg.d_enc, cfg.norm, cfg.norm_eps)
        self.w = _linear_init(cfg.d_enc, cfg.d_model, fan_in=cfg.d_enc)
        self.b = _linear_init(cfg.d_model, fan_in=cfg.d_enc)
        self.norm_out = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model) if cfg.vocab_size else None

    def forward(self, x_enc: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x_enc, self.config.d_enc, self.w, "FeatureFusion")
        x_enc = _autocast_input(x_enc)
        x = self.norm_out(torch.nn.functional.silu(self.norm_in(x_enc) @ self.w + self.b))
        if tokens is None:
            return x
        if self.embed is None:
            raise ValueError("FeatureFusion: tokens were given but vocab_size is 0")
        if tokens.shape != x.shape[:-1]:
            raise ValueError(f"FeatureFusion: tokens shape {tuple(tokens.shape)} does not match "
                             f"the features' leading shape {tuple(x.shape[:-1])}")
        return x + self.embed(tokens).to(x.dtype)


def stack_frames(frames: torch.Tensor, n: int = 4) -> torch.Tensor:
    """Stack n consecutive encoder frames: ``[B, L, C] -> [B, L // n, n * C]`` (Whisper 50 Hz,
    1280-d, n=4 -> 12.5 Hz, 5120-d). Trailing frames that do not fill a group are dropped."""
    B, L, C = frames.shape
    L = (L // n) * n
    return frames[:, :L].reshape(B, L // n, n * C)
