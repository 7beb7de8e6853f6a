"""The low-res tower: an HF CLIP ViT returning one selected layer's patch features.

Only the layers up to the selected one run (LLaVA's penultimate layer skips the last
layer entirely), so the tower costs less than the full HF forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPVisionConfig, CLIPVisionModel

from minigem.config import VisionConfig
from minigem.errors import CheckpointError, ConfigError


def hf_config_from_dict(cls: type, values: dict, where: str):
    """Build an HF config, rejecting keys the config class does not know."""
    default = cls()
    unknown = [k for k in values if not hasattr(default, k) and k not in ("model_type",)]
    if unknown:
        raise ConfigError(f"{where}: unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
    return cls(**values)


class CLIPTower(nn.Module):
    """pixel_values [B, 3, S, S] -> features [B, N, C] (N = (S/P)^2, +1 with cls_patch)."""

    def __init__(self, cfg: VisionConfig, model: CLIPVisionModel) -> None:
        super().__init__()
        self.model = model
        hf = model.config
        self.num_layers = hf.num_hidden_layers
        sel = cfg.select_layer
        # hidden_states[0] is the embedding output; hidden_states[i] follows layer i.
        self.depth = sel if sel >= 0 else self.num_layers + 1 + sel
        if not 0 <= self.depth <= self.num_layers:
            raise ConfigError(
                f"model.vision.select_layer={sel}: the tower has {self.num_layers} layers "
                f"(valid: {-self.num_layers - 1}..{self.num_layers})"
            )
        self.keep_cls = cfg.select_feature == "cls_patch"
        self.image_size: int = hf.image_size
        self.patch_size: int = hf.patch_size
        self.hidden_size: int = hf.hidden_size
        self.gradient_checkpointing = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + int(self.keep_cls)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        m = self.model
        dtype = m.embeddings.patch_embedding.weight.dtype
        h = m.embeddings(pixel_values.to(dtype))  # [B, 1+N, C]
        h = m.pre_layrnorm(h)
        for layer in m.encoder.layers[: self.depth]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, None, use_reentrant=False)
            else:
                h = layer(h, None)
        return h if self.keep_cls else h[:, 1:]  # [B, N, C]


def build_clip_tower(cfg: VisionConfig) -> CLIPTower:
    if cfg.path is not None:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"model.vision.path: {path} is not a model directory (no config.json)")
        model = CLIPVisionModel.from_pretrained(path, **({} if not cfg.config else cfg.config))
    else:
        model = CLIPVisionModel(hf_config_from_dict(CLIPVisionConfig, cfg.config, "model.vision.config"))
    return CLIPTower(cfg, model)
