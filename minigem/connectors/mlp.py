"""LLaVA projectors: `linear` and `mlp2x_gelu` (Linear -> GELU -> Linear)."""

from __future__ import annotations

import torch
from torch import nn

from minigem.config import ConnectorConfig
from minigem.connectors.base import CONNECTORS, Connector
from minigem.vision.base import VisionFeatures


def make_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """The LLaVA projector as an nn.Sequential (key names `0.*`, `2.*` as in the release)."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector {kind!r}; valid: linear, mlp2x_gelu")


class ProjectorConnector(Connector):
    """Projects each low-res token: [B, N, C] -> [B, N, D]."""

    def __init__(self, kind: str, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.projector = make_projector(kind, vision_dim, llm_dim)

    def forward(self, feats: VisionFeatures) -> torch.Tensor:
        return self.projector(self.pooled(feats.low_res))


@CONNECTORS.register("linear")
def _linear(cfg: ConnectorConfig, vision_dim: int, llm_dim: int, aux_dim: int | None) -> Connector:
    return ProjectorConnector("linear", vision_dim, llm_dim)


@CONNECTORS.register("mlp2x_gelu")
def _mlp(cfg: ConnectorConfig, vision_dim: int, llm_dim: int, aux_dim: int | None) -> Connector:
    return ProjectorConnector("mlp2x_gelu", vision_dim, llm_dim)
