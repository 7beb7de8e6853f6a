"""Function-preserving FFN widening (Net2WiderNet): the dense control of the MoE ablation.

`widen_ffn(lm, cfg)` replaces the chosen decoder layers' FFN projections by `factor`x wider ones
in place. Hidden unit j is copied `factor` times: the input projections' rows (`gate_proj` and
`up_proj` of a gated FFN, or `fc1` with its bias) are duplicated, and the output projection's
column j (`down_proj` / `fc2`) is split between the copies with random positive shares that sum
to 1. The output is unchanged (up to float rounding), and since the copies carry different
shares their gradients differ, so they do not stay identical under training (equal shares would
keep the copies tied forever: Net2Net's symmetry problem).

Widened layers are part of the model config (`model.ffn_widen`), so a saved checkpoint rebuilds
the same shapes when loaded; the HF config keeps the base `intermediate_size`.
"""

from __future__ import annotations

import torch
from torch import nn

from minigem.config import FFNWidenConfig
from minigem.errors import ConfigError
from minigem.llm.moe import decoder_layers, moe_layer_indices

_PAIRS = ((("gate_proj", "up_proj"), "down_proj"), (("fc1",), "fc2"))


def _projections(ffn: nn.Module, i: int) -> tuple[list[nn.Linear], nn.Linear]:
    for ins, out in _PAIRS:
        mods = [getattr(ffn, n, None) for n in (*ins, out)]
        if all(isinstance(m, nn.Linear) for m in mods):
            return mods[:-1], mods[-1]
    raise ConfigError(
        f"model.ffn_widen: decoder layer {i} FFN ({type(ffn).__name__}) has neither "
        "gate_proj/up_proj/down_proj nor fc1/fc2 Linear layers")


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


@torch.no_grad()
def widen_ffn(lm: nn.Module, cfg: FFNWidenConfig, generator: torch.Generator | None = None) -> list[int]:
    """Widen the FFNs of the layers `cfg.layers` selects by `cfg.factor`, preserving the function.

    Returns the widened layer indices. Validation happens before any layer is modified.
    """
    layers = decoder_layers(lm)
    indices = moe_layer_indices(len(layers), cfg.layers)
    found = {}
    for i in indices:
        ffn = getattr(layers[i], "mlp", None)
        if not isinstance(ffn, nn.Module):
            raise ConfigError(f"model.ffn_widen: decoder layer {i} has no `mlp` module")
        found[i] = _projections(ffn, i)
    k = cfg.factor
    for i, (ins, out) in found.items():
        ffn = layers[i].mlp
        width = out.in_features
        for lin in ins:
            name = next(n for n, m in ffn.named_children() if m is lin)
            b = lin.bias.repeat(k) if lin.bias is not None else None
            setattr(ffn, name, _linear(lin.weight.repeat(k, 1), b))
        share = torch.rand(k, width, generator=generator, dtype=torch.float32) + 0.5  # in [0.5, 1.5)
        share = (share / share.sum(0, keepdim=True)).to(out.weight.dtype).to(out.weight.device)
        w = torch.cat([out.weight * share[c] for c in range(k)], dim=1)
        name = next(n for n, m in ffn.named_children() if m is out)
        setattr(ffn, name, _linear(w, out.bias))
        if hasattr(ffn, "intermediate_size"):
            ffn.intermediate_size = width * k
    return indices
