"""Swap the MoE-Adapter into Hugging Face transformers audio LLMs.

``swap_adapter(model)`` finds the audio projector of a supported model, infers its input and
output dims, builds a :class:`MoEAdapter` on the projector's device and dtype (the paper preset
scaled to those dims, or ``init="upcycle"``: routed experts that copy the projector, so the
swapped model's outputs equal the original's at initialisation) and puts it in place. The swap is
recorded in ``model.config.moe_adapter``, so ``save_pretrained`` keeps it and
:func:`load_swapped` re-applies it before loading the adapter's weights. transformers stays an
optional dependency: nothing here imports it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from torch import nn

from ..config import MoEAdapterConfig
from ..modules import MoEAdapter
from ..reference import RoutingStats

# model_type -> (container module path, attributes replaced in forward order). The first
# attribute becomes the adapter, the others nn.Identity. Paths are tried under the model, its
# ``.model`` (transformers 5.x) and its ``.thinker`` (Omni models).
SUPPORTED = {
    "qwen2_audio": ("", ("multi_modal_projector",)),
    "voxtral": ("", ("multi_modal_projector",)),
    "audioflamingo3": ("", ("multi_modal_projector",)),
    "musicflamingo": ("", ("multi_modal_projector",)),
    "glmasr": ("", ("multi_modal_projector",)),
    "moss_transcribe_diarize": ("", ("multi_modal_projector",)),
    "qwen2_5_omni": ("audio_tower", ("proj",)),
    "qwen2_5_omni_thinker": ("audio_tower", ("proj",)),
    "qwen3_omni_moe": ("audio_tower", ("proj1", "act", "proj2")),
    "qwen3_omni_moe_thinker": ("audio_tower", ("proj1", "act", "proj2")),
}
PREFIXES = ("", "model.", "thinker.", "thinker.model.", "model.thinker.")
# the layers of a projector module, in forward order, by the names transformers uses
PROJECTOR_LAYERS = ("linear", "linear_1", "act", "linear_2", "norm")


def _get(root: nn.Module, path: str):
    mod = root
    for part in filter(None, path.split(".")):
        if not hasattr(mod, part):
            return None
        mod = getattr(mod, part)
    return mod


def locate(model: nn.Module, module_path: str | None = None) -> tuple[str, tuple[str, ...]]:
    """(container path, replaced attributes) of the model's audio projector."""
    if module_path is not None:
        container, _, attr = module_path.rpartition(".")
        if _get(model, module_path) is None:
            raise ValueError(f"swap_adapter: the model has no module at {module_path!r}")
        return container, (attr,)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(
            f"swap_adapter: unsupported model type {model_type!r}. Supported: "
            f"{', '.join(sorted(SUPPORTED))}. For another model pass module_path= the dotted "
            "path of its audio projector (a module mapping [..., d_in] to [..., d_out]), e.g. "
            "module_path='model.multi_modal_projector'.")
    path, attrs = SUPPORTED[model_type]
    for prefix in PREFIXES:
        container = (prefix + path).rstrip(".")
        mod = _get(model, container)
        if mod is not None and all(hasattr(mod, a) for a in attrs):
            return container, attrs
    raise ValueError(f"swap_adapter: found no {'.'.join(filter(None, [path, attrs[0]]))} in "
                     f"this {model_type} model; pass module_path= explicitly")


def _layers(mods: list[nn.Module]) -> list[nn.Module]:
    """The projector as a flat list of layers in forward order."""
    if len(mods) == 1 and isinstance(mods[0], nn.Sequential):
        return list(mods[0])
    if len(mods) == 1 and not isinstance(mods[0], nn.Linear):
        inner = [getattr(mods[0], n) for n in PROJECTOR_LAYERS if hasattr(mods[0], n)]
        if not inner:
            raise ValueError(f"swap_adapter: cannot read the layers of "
                             f"{type(mods[0]).__name__}; expected an nn.Sequential, an "
                             f"nn.Linear or attributes among {PROJECTOR_LAYERS}")
        return inner
    return mods


def _dims(layers: list[nn.Module]) -> tuple[int, int]:
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("swap_adapter: the projector has no nn.Linear to infer dims from")
    return linears[0].in_features, linears[-1].out_features


def _activation_name(act: nn.Module) -> str:
    name = type(act).__name__.lower()
    if "gelu" in name and getattr(act, "approximate", "none") == "none" and "fast" not in name \
            and "new" not in name and "quick" not in name:
        return "gelu"
    if "silu" in name or "swish" in name:
        return "silu"
    raise ValueError(f"swap_adapter: cannot upcycle activation {type(act).__name__} exactly "
                     "(supported: exact GELU, SiLU); use init='random'")


def upcycle_config(layers: list[nn.Module], num_experts: int = 8, top_k: int = 4,
                   **overrides) -> MoEAdapterConfig:
    """A config whose routed experts can copy the projector exactly (norms off, no shared)."""
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    norms = [m for m in layers if isinstance(m, nn.LayerNorm)]
    d_in, d_out = _dims(layers)
    if len(linears) == 1:
        kw = dict(expert_dim=d_in, expert_activation="identity")
    elif len(linears) == 2:
        acts = [m for m in layers if not isinstance(m, (nn.Linear, nn.LayerNorm))]
        kw = dict(expert_dim=linears[0].out_features,
                  expert_activation=_activation_name(acts[0]) if acts else "identity")
    else:
        raise ValueError("swap_adapter: can upcycle a Linear or a Linear-act-Linear projector "
                         f"(optionally followed by a LayerNorm), got {len(linears)} Linears")
    if norms and layers[-1] is not norms[-1]:
        raise ValueError("swap_adapter: a LayerNorm can only be upcycled at the end")
    kw.update(d_in=d_in, d_out=d_out, num_experts=num_experts, top_k=top_k, shared_dim=0,
              bias=any(m.bias is not None for m in linears), input_norm=False,
              output_norm=bool(norms), norm="layernorm", aux_loss_coef=0.01)
    if norms:
        kw["norm_eps"] = norms[-1].eps
    kw.update(overrides)
    return MoEAdapterConfig(**kw)


@torch.no_grad()
def _copy_projector(adapter: MoEAdapter, layers: list[nn.Module]) -> None:
    """Every routed expert = the projector; the gates sum to 1, so the output is unchanged."""
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    norms = [m for m in layers if isinstance(m, nn.LayerNorm)]
    E = adapter.config.num_experts
    if len(linears) == 1:
        first = torch.eye(linears[0].in_features)
        first_b, second = None, linears[0]
    else:
        first, first_b, second = linears[0].weight.t(), linears[0].bias, linears[1]
    adapter.w1.copy_(first.expand(E, *first.shape))
    adapter.w2.copy_(second.weight.t().expand(E, *second.weight.t().shape))
    if adapter.config.bias:
        adapter.b1.zero_()
        if first_b is not None:
            adapter.b1.copy_(first_b.expand(E, -1))
        adapter.b2.zero_()
        if second.bias is not None:
            adapter.b2.copy_(second.bias.expand(E, -1))
    if norms:
        adapter.norm_out.weight.copy_(norms[-1].weight)
        adapter.norm_out.bias.copy_(norms[-1].bias)


def paper_config(d_in: int, d_out: int, **overrides) -> MoEAdapterConfig:
    """The paper preset scaled to a projector's dims (expert width d_in / 2, shared 4 d_in)."""
    kw = dict(d_in=d_in, d_out=d_out, expert_dim=max(1, d_in // 2), shared_dim=4 * d_in)
    kw.update(overrides)
    return MoEAdapterConfig.paper(**kw)


def swap_adapter(model: nn.Module, config: MoEAdapterConfig | None = None, *,
                 init: str = "random", backend: str = "auto",
                 module_path: str | None = None) -> MoEAdapter:
    """Replace the audio projector of ``model`` with a MoEAdapter and return the adapter.

    ``config``: the adapter's config (default: the paper preset scaled to the projector's dims
    for ``init="random"``, or an exact mirror for ``init="upcycle"``). ``module_path``: the dotted
    path of the projector for models not in :data:`SUPPORTED`.
    """
    if init not in ("random", "upcycle"):
        raise ValueError(f"swap_adapter: init must be 'random' or 'upcycle', got {init!r}")
    container_path, attrs = locate(model, module_path)
    container = _get(model, container_path)
    old = [getattr(container, a) for a in attrs]
    if any(isinstance(m, MoEAdapter) for m in old):
        raise ValueError("swap_adapter: this model's projector is already a MoEAdapter")
    layers = _layers(old)
    d_in, d_out = _dims(layers)
    if config is None:
        config = upcycle_config(layers) if init == "upcycle" else paper_config(d_in, d_out)
    if (config.d_in, config.d_out) != (d_in, d_out):
        raise ValueError(f"swap_adapter: config maps {config.d_in} -> {config.d_out} but the "
                         f"projector maps {d_in} -> {d_out}")
    ref = next(m.weight for m in layers if isinstance(m, nn.Linear))
    adapter = MoEAdapter(config, backend=backend)
    if init == "upcycle":
        _copy_projector(adapter, layers)
    adapter.to(device=ref.device, dtype=ref.dtype)
    setattr(container, attrs[0], adapter)
    for a in attrs[1:]:
        setattr(container, a, nn.Identity())
    qualified = ".".join(filter(None, [container_path, attrs[0]]))
    if getattr(model, "config", None) is not None:
        model.config.moe_adapter = {"module_path": qualified, "replaced": list(attrs),
                                    "config": dataclasses.asdict(config)}
    return adapter


def adapters(model: nn.Module) -> dict[str, MoEAdapter]:
    """Every MoEAdapter in ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoEAdapter)}


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``aux_loss`` (already lambda-scaled) of every MoEAdapter in ``model`` that ran a
    forward since its creation; add it to the task loss after each forward."""
    losses = [m.aux_loss for m in adapters(model).values() if m.aux_loss is not None]
    if not losses:
        raise RuntimeError("moe_aux_loss: no MoEAdapter in this model has run a forward")
    return torch.stack([loss.float() for loss in losses]).sum()


def routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """The last forward's routing statistics of every MoEAdapter in ``model``."""
    return {n: m.routing_stats() for n, m in adapters(model).items() if m.aux_loss is not None}


def reapply_swap(model: nn.Module, backend: str = "auto") -> MoEAdapter:
    """Re-create the adapter recorded in ``model.config.moe_adapter`` (randomly initialised:
    load its weights next), e.g. on a model rebuilt from a saved config."""
    info = getattr(model.config, "moe_adapter", None)
    if not info:
        raise ValueError("reapply_swap: model.config has no moe_adapter record; was the "
                         "checkpoint saved from a swapped model?")
    path = info["module_path"]
    container_path, _, first = path.rpartition(".")
    container = _get(model, container_path)
    if isinstance(getattr(container, first, None), MoEAdapter):
        return getattr(container, first)
    attrs = info["replaced"]
    config = MoEAdapterConfig(**info["config"])
    ref = next(p for p in model.parameters())
    adapter = MoEAdapter(config, backend=backend).to(device=ref.device, dtype=ref.dtype)
    setattr(container, attrs[0], adapter)
    for a in attrs[1:]:
        setattr(container, a, nn.Identity())
    return adapter


def _checkpoint_tensors(path: str, module_path: str, names) -> dict[str, torch.Tensor]:
    """The adapter's tensors from a save_pretrained folder (safetensors, sharded or not).

    transformers may save keys under another prefix than the in-memory path (5.x writes the
    legacy names, e.g. without ``model.``), so the adapter's keys are found as the one prefix
    ending in the adapter's attribute name under which every adapter tensor exists."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    handles = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            handles.update({key: (name, key) for key in f.keys()})
    attr = module_path.rpartition(".")[2] + "."
    names = list(names)
    prefixes = {key[: -len(n)] for key in handles for n in names if key.endswith("." + n)}
    found = [p for p in prefixes if (p == attr or p.endswith("." + attr))
             and all(p + n in handles for n in names)]
    if len(found) != 1:
        raise ValueError(f"load_swapped: expected one set of adapter tensors for {module_path!r} "
                         f"in {path}, found {len(found)}")
    out = {}
    for n in names:
        file, key = handles[found[0] + n]
        with safe_open(os.path.join(path, file), framework="pt") as f:
            out[n] = f.get_tensor(key)
    return out


def load_swapped(model_class, path: str, backend: str = "auto", **kwargs) -> nn.Module:
    """``model_class.from_pretrained(path, **kwargs)`` for a checkpoint saved from a swapped
    model: re-applies the swap, then loads the adapter's weights strictly (every adapter tensor
    must be in the checkpoint), so nothing is silently re-initialised. transformers' own report
    of the old projector's keys as missing is expected: that projector no longer exists."""
    model = model_class.from_pretrained(path, **kwargs)
    adapter = reapply_swap(model, backend=backend)
    names = adapter.state_dict().keys()
    adapter.load_state_dict(_checkpoint_tensors(path, model.config.moe_adapter["module_path"],
                                                names), strict=True)
    return model
