"""MoE-LLaVA sparse mixture-of-experts FFNs: the public API.

The layer itself (router, experts, dispatch, aux loss) lives in `moe_layer.py`; this file puts
SparseMoE layers into an HF causal LM and reads back what they produce:

- `moe_layer_indices(n, spec)`: which decoder layers get an MoE FFN (MoE-LLaVA `moe_mode`).
- `apply_moe(lm, cfg)`: upcycle - replace `layer.mlp` by a SparseMoE whose experts are exact
  copies of that layer's dense FFN (module replacement; no patched forwards).
- `collect_aux_loss(model)`: the aux-loss channel - sum of every MoE layer's last weighted aux
  loss, plus per-layer floats for logging. The training loop adds `total` to the LM loss.
- `moe_parameters(model)`: experts + routers (+ shared expert) only: MoE-Tuning stage III.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from minigem.config import MoEConfig
from minigem.errors import ConfigError
from minigem.llm.moe_layer import SparseMoE, expert_capacity, validate_moe_config

__all__ = [
    "SparseMoE",
    "apply_moe",
    "collect_aux_loss",
    "expert_capacity",
    "moe_layer_indices",
    "moe_layers",
    "moe_parameters",
    "validate_moe_config",
]

LayersSpec = str | list[int]


def moe_layer_indices(num_layers: int, layers_spec: LayersSpec) -> list[int]:
    """Decoder-layer indices that get an MoE FFN.

    "sparse": 0, 2, 4, ... (MoE-LLaVA default); "first_half": [0, n//2); "second_half":
    [n//2, n); "all": every layer; a list: exactly those (sorted; each in [0, n), no repeats).
    """
    if num_layers < 1:
        raise ConfigError(f"model.moe.layers: the language model has {num_layers} decoder layers")
    if isinstance(layers_spec, str):
        modes = {
            "sparse": range(0, num_layers, 2),
            "first_half": range(0, num_layers // 2),
            "second_half": range(num_layers // 2, num_layers),
            "all": range(num_layers),
        }
        if layers_spec not in modes:
            raise ConfigError(
                f"model.moe.layers={layers_spec!r}: unknown mode; valid: {', '.join(modes)} "
                "or a list of layer indices"
            )
        picked = list(modes[layers_spec])
        if not picked:
            raise ConfigError(
                f"model.moe.layers={layers_spec!r} selects no layer of a {num_layers}-layer model"
            )
        return picked
    if not layers_spec:
        raise ConfigError("model.moe.layers=[]: list at least one decoder-layer index")
    for i in layers_spec:
        if not 0 <= i < num_layers:
            raise ConfigError(
                f"model.moe.layers: layer index {i} is out of range: the language model has "
                f"{num_layers} decoder layers (valid indices 0..{num_layers - 1})"
            )
    if len(set(layers_spec)) != len(layers_spec):
        raise ConfigError(f"model.moe.layers={layers_spec}: an index is listed twice")
    return sorted(layers_spec)


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of an HF causal LM (or its base model): `get_decoder().layers`."""
    decoder = lm.get_decoder() if isinstance(lm, PreTrainedModel) else lm
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"model.moe: {type(lm).__name__} has no decoder-layer list (`get_decoder().layers`); "
            "MoE supports HF decoder-only LMs (llama, qwen2, mistral, gemma, phi, stablelm, ...)"
        )
    return layers


def apply_moe(lm: nn.Module, cfg: MoEConfig) -> list[int]:
    """Upcycle `lm` in place: swap `layers[i].mlp` for a SparseMoE on the chosen layers.

    Every expert (and the shared expert) starts as an exact copy of that layer's dense FFN, so
    the model's outputs are unchanged in dropless mode. Returns the converted layer indices.
    Validation (config, indices, layers without `mlp`, already-MoE layers) happens before any
    layer is modified.
    """
    validate_moe_config(cfg)
    layers = decoder_layers(lm)
    indices = moe_layer_indices(len(layers), cfg.layers)
    for i in indices:
        ffn = getattr(layers[i], "mlp", None)
        if not isinstance(ffn, nn.Module):
            raise ConfigError(
                f"model.moe: decoder layer {i} ({type(layers[i]).__name__}) has no `mlp` module; "
                "MoE replaces the FFN found at `layer.mlp`"
            )
        if isinstance(ffn, SparseMoE):
            raise ConfigError(
                f"model.moe: decoder layer {i} is already a SparseMoE (upcycled twice?)"
            )
    for i in indices:
        layer = layers[i]
        moe = SparseMoE(layer.mlp, _hidden_size(lm, layer.mlp), cfg)
        layer.mlp = moe.train(layer.mlp.training)  # a new module must not flip eval -> train
    return indices


def _hidden_size(lm: nn.Module, ffn: nn.Module) -> int:
    """The LM width: from the HF config, else the first Linear's input size in the FFN."""
    if isinstance(lm, PreTrainedModel):
        return lm.config.get_text_config().hidden_size
    return next(m for m in ffn.modules() if isinstance(m, nn.Linear)).in_features


def moe_layers(model: nn.Module) -> dict[str, SparseMoE]:
    """Every SparseMoE in `model`, by module name."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, SparseMoE)}


def collect_aux_loss(model: nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
    """(total, per_layer) from the last forward of every SparseMoE in `model`.

    `total` is a 0-dim fp32 tensor (differentiable; already weighted by aux_loss_coef /
    z_loss_coef; 0 when the model has no MoE layer or none has run); add it to the LM loss.
    `per_layer` maps module name -> float for logging (one host sync for all layers).
    """
    found = [(name, mod.aux_loss) for name, mod in moe_layers(model).items()]
    found = [(name, loss) for name, loss in found if loss is not None]
    if not found:
        ref = next(model.parameters(), None)
        return torch.zeros((), device=ref.device if ref is not None else None), {}
    stacked = torch.stack([loss for _, loss in found])  # [L]
    values = stacked.detach().tolist()
    return stacked.sum(), {name: v for (name, _), v in zip(found, values, strict=True)}


def moe_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, param) of MoE layers only - experts, routers, shared experts (stage III)."""
    for prefix, mod in moe_layers(model).items():
        for name, param in mod.named_parameters():
            yield f"{prefix}.{name}", param
