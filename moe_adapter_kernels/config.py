"""Configurations and presets for the MoE-Adapter, the dense baseline and the fusion front end.

Weight layout (one for every backend, stated once): every projection is stored as ``[in, out]``
so that ``y = x @ W``; routed experts are stacked on a leading expert axis, ``[E, in, out]``.
For SwiGLU experts the up-projection holds the gate half then the up half, ``[E, in, 2F]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

NORMS = ("layernorm", "rmsnorm", "none")
TOPOLOGIES = ("shared", "post")
ACTIVATIONS = ("silu", "swiglu", "gelu", "identity")
SHARED_ACTIVATIONS = ("silu", "gelu", "identity")
AUX_VARIANTS = ("topk", "softmax")
ROUTER_DTYPES = ("float32", "float64")


def _require(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{field}: {msg}")


def _check_positive(obj, *fields: str) -> None:
    for f in fields:
        v = getattr(obj, f)
        _require(isinstance(v, int) and not isinstance(v, bool) and v > 0, f,
                 f"must be a positive integer, got {v!r}")


def _check_choice(obj, field: str, choices) -> None:
    v = getattr(obj, field)
    _require(v in choices, field, f"unknown value {v!r}; expected one of {', '.join(choices)}")


def _check_eps(obj) -> None:
    _require(isinstance(obj.norm_eps, (int, float)) and obj.norm_eps > 0, "norm_eps",
             f"must be a positive number, got {obj.norm_eps!r}")


@dataclass(frozen=True)
class MoEAdapterConfig:
    """The sparse MoE-Adapter (paper eqs. 2-5, Table 4 III).

    topology ``shared``: ``y = N(sum_i G_i E_i(u) + S(u))``, experts ``d_in -> expert_dim ->
    d_out`` and an always-on shared expert ``d_in -> shared_dim -> d_out`` (0 disables it).
    topology ``post``: ``y = N(A(N(sum_i G_i E_i(u))))``, experts ``d_in -> expert_dim -> d_in``
    and an aggregation MLP ``A: d_in -> shared_dim -> d_out`` after the routed sum.
    ``expert_activation`` applies to routed experts, ``shared_activation`` to the shared /
    aggregation MLP (SiLU in the paper; GELU and identity exist to mirror projectors being
    upcycled). ``bias`` adds biases to every projection but the gate. ``input_norm`` /
    ``output_norm`` switch the first / last norm off (``norm`` picks their kind).
    ``aux_loss_coef`` is the paper's lambda: the module's ``aux_loss`` is already scaled by it.
    """

    d_in: int = 2560
    d_out: int = 2048
    num_experts: int = 8
    top_k: int = 4
    expert_dim: int = 1280
    shared_dim: int = 10240
    topology: str = "shared"
    expert_activation: str = "silu"
    shared_activation: str = "silu"
    bias: bool = False
    norm: str = "layernorm"
    input_norm: bool = True
    output_norm: bool = True
    norm_eps: float = 1e-5
    aux_loss_coef: float = 0.01
    aux_loss_variant: str = "topk"
    router_dtype: str = "float32"

    def __post_init__(self):
        _check_positive(self, "d_in", "d_out", "num_experts", "top_k", "expert_dim")
        _require(isinstance(self.shared_dim, int) and self.shared_dim >= 0, "shared_dim",
                 f"must be a non-negative integer, got {self.shared_dim!r}")
        _require(self.top_k <= self.num_experts, "top_k",
                 f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        _check_choice(self, "topology", TOPOLOGIES)
        _check_choice(self, "expert_activation", ACTIVATIONS)
        _check_choice(self, "shared_activation", SHARED_ACTIVATIONS)
        for flag in ("bias", "input_norm", "output_norm"):
            _require(isinstance(getattr(self, flag), bool), flag,
                     f"must be True or False, got {getattr(self, flag)!r}")
        _check_choice(self, "norm", NORMS)
        _check_choice(self, "aux_loss_variant", AUX_VARIANTS)
        _check_choice(self, "router_dtype", ROUTER_DTYPES)
        _check_eps(self)
        _require(isinstance(self.aux_loss_coef, (int, float)) and self.aux_loss_coef >= 0,
                 "aux_loss_coef", f"must be a non-negative number, got {self.aux_loss_coef!r}")
        _require(not (self.topology == "post" and self.shared_dim == 0), "shared_dim",
                 "topology 'post' needs shared_dim > 0 (the aggregation MLP width)")

    @property
    def expert_out(self) -> int:
        """Output width of one routed expert."""
        return self.d_in if self.topology == "post" else self.d_out

    @property
    def expert_up(self) -> int:
        """Columns of one expert's up-projection (2x expert_dim for SwiGLU)."""
        return 2 * self.expert_dim if self.expert_activation == "swiglu" else self.expert_dim

    def norm_at(self, position: str) -> str:
        """The norm kind at ``in``, ``mid`` (post topology) or ``out``; ``none`` when off."""
        on = {"in": self.input_norm, "mid": self.topology == "post", "out": self.output_norm}
        return self.norm if on[position] else "none"

    def replace(self, **changes) -> "MoEAdapterConfig":
        return dataclasses.replace(self, **changes)

    # ---- parameter and FLOP counts ----------------------------------------------------------
    def _expert_params(self) -> int:
        biases = self.expert_up + self.expert_out if self.bias else 0
        return self.d_in * self.expert_up + self.expert_dim * self.expert_out + biases

    def _shared_params(self) -> int:
        if not self.shared_dim:
            return 0
        biases = self.shared_dim + self.d_out if self.bias else 0
        return self.d_in * self.shared_dim + self.shared_dim * self.d_out + biases

    def _norms(self) -> int:
        n = {"layernorm": 2, "rmsnorm": 1, "none": 0}
        return sum(n[self.norm_at(pos)] * dim for pos, dim in
                   (("in", self.d_in), ("mid", self.d_in), ("out", self.d_out)))

    def total_parameters(self) -> int:
        """All parameters: gate, every routed expert, shared/aggregation MLP, norms."""
        return (self.d_in * self.num_experts + self.num_experts * self._expert_params()
                + self._shared_params() + self._norms())

    def active_parameters(self) -> int:
        """Parameters one token touches: gate, its top_k experts, shared MLP, norms."""
        return (self.d_in * self.num_experts + self.top_k * self._expert_params()
                + self._shared_params() + self._norms())

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token (2 per multiply-add; norms, biases and activations
        excluded)."""
        e = self.d_in * self.expert_up + self.expert_dim * self.expert_out
        s = self.d_in * self.shared_dim + self.shared_dim * self.d_out
        return 2 * (self.d_in * self.num_experts + self.top_k * e + s)

    # ---- presets ----------------------------------------------------------------------------
    @classmethod
    def paper(cls, **overrides) -> "MoEAdapterConfig":
        """Default reading of Table 4: 8 choose 4, SiLU experts 2560->1280->2048, shared
        expert 2560->10240->2048 in parallel. 94.39M total, 70.8M active."""
        return cls(**overrides)

    @classmethod
    def paper_post_swiglu(cls, **overrides) -> "MoEAdapterConfig":
        """Alternative reading of Table 4: SwiGLU experts 2560->768->2560, summed, then an
        aggregation MLP 2560->10240->2048. Also 94.39M total, 70.8M active."""
        kw = dict(topology="post", expert_activation="swiglu", expert_dim=768)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def preset(cls, name: str, **overrides) -> "MoEAdapterConfig":
        """A named preset from :data:`MOE_PRESETS`."""
        if name not in MOE_PRESETS:
            raise ValueError(f"preset: unknown name {name!r}; expected one of "
                             f"{', '.join(MOE_PRESETS)}")
        kw = dict(MOE_PRESETS[name])
        kw.update(overrides)
        return cls(**kw)


# name -> constructor arguments; Table 2 ablations change one knob of the paper default.
MOE_PRESETS: dict[str, dict] = {
    "paper": {},
    "post-swiglu": dict(topology="post", expert_activation="swiglu", expert_dim=768),
    "16c4": dict(num_experts=16, top_k=4),
    "8c1": dict(num_experts=8, top_k=1),
    "4c2": dict(num_experts=4, top_k=2),
    "width-half": dict(expert_dim=640),
    "width-double": dict(expert_dim=2560),
    "eureka-rmsnorm": dict(norm="rmsnorm", norm_eps=1e-6),
}


@dataclass(frozen=True)
class DenseAdapterConfig:
    """The dense baseline (paper eq. 1, Table 4 II): ``y = N(W2 SiLU(W1 N(x)))``."""

    d_in: int = 2560
    d_out: int = 2048
    hidden_dim: int = 20480
    norm: str = "layernorm"
    norm_eps: float = 1e-5

    def __post_init__(self):
        _check_positive(self, "d_in", "d_out", "hidden_dim")
        _check_choice(self, "norm", NORMS)
        _check_eps(self)

    @classmethod
    def paper(cls, **overrides) -> "DenseAdapterConfig":
        """The 94.4M dense baseline of Table 4."""
        return cls(**overrides)

    def replace(self, **changes) -> "DenseAdapterConfig":
        return dataclasses.replace(self, **changes)

    def total_parameters(self) -> int:
        norm = {"layernorm": 2, "rmsnorm": 1, "none": 0}[self.norm]
        return (self.d_in * self.hidden_dim + self.hidden_dim * self.d_out
                + norm * (self.d_in + self.d_out))

    def active_parameters(self) -> int:
        return self.total_parameters()

    def flops_per_token(self) -> int:
        return 2 * (self.d_in * self.hidden_dim + self.hidden_dim * self.d_out)


@dataclass(frozen=True)
class FeatureFusionConfig:
    """Front end shared by both adapters (Table 4 I): ``N(SiLU(W_f N(x_enc)))`` with 4 stacked
    1280-d Whisper frames (5120) -> 2560, plus optional discrete-token embeddings summed in
    (Kimi-Audio dual stream; ``vocab_size=0`` disables them)."""

    d_enc: int = 5120
    d_model: int = 2560
    vocab_size: int = 0
    norm: str = "layernorm"
    norm_eps: float = 1e-5

    def __post_init__(self):
        _check_positive(self, "d_enc", "d_model")
        _require(isinstance(self.vocab_size, int) and self.vocab_size >= 0, "vocab_size",
                 f"must be a non-negative integer, got {self.vocab_size!r}")
        _check_choice(self, "norm", NORMS)
        _check_eps(self)
