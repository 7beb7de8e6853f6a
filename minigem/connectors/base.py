"""The connector interface and registry."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from minigem.config import ConnectorConfig
from minigem.registry import Registry
from minigem.vision.base import VisionFeatures

ConnectorBuilder = Callable[[ConnectorConfig, int, int, "int | None"], "Connector"]
CONNECTORS: Registry[ConnectorBuilder] = Registry("connector")


class Connector(nn.Module):
    """Base class: ``forward(VisionFeatures) -> [B, T, D_llm]``."""

    def forward(self, feats: VisionFeatures):  # pragma: no cover - interface
        raise NotImplementedError

    def num_tokens(self, n_low_res: int) -> int:
        """Visual tokens per image view given N low-res tokens (most keep N)."""
        return n_low_res


def build_connector(
    cfg: ConnectorConfig, vision_dim: int, llm_dim: int, aux_dim: int | None = None
) -> Connector:
    return CONNECTORS.get(cfg.type)(cfg, vision_dim, llm_dim, aux_dim)
