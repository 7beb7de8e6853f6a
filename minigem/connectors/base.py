"""The connector interface and registry."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minigem.config import ConnectorConfig
from minigem.registry import Registry
from minigem.vision.base import VisionFeatures

ConnectorBuilder = Callable[[ConnectorConfig, int, int, "int | None"], "Connector"]
CONNECTORS: Registry[ConnectorBuilder] = Registry("connector")


def pool_grid(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Average-pool a square grid of tokens k x k: [B, N, C] -> [B, N / k^2, C] (row-major)."""
    if k == 1:
        return tokens
    b, n, c = tokens.shape
    side = math.isqrt(n)
    if side * side != n or side % k:
        raise ValueError(
            f"connector pool={k} needs a square grid of low-res tokens with a side divisible by "
            f"{k}; got N={n} (select_feature cls_patch adds a CLS token: use `patch`)"
        )
    grid = tokens.transpose(1, 2).reshape(b, c, side, side)
    return F.avg_pool2d(grid, k).flatten(2).transpose(1, 2)


class Connector(nn.Module):
    """Base class: ``forward(VisionFeatures) -> [B, T, D_llm]``.

    ``pool`` (ConnectorConfig.pool) average-pools the low-res grid k x k first."""

    pool: int = 1

    def forward(self, feats: VisionFeatures):  # pragma: no cover - interface
        raise NotImplementedError

    def pooled(self, low_res: torch.Tensor) -> torch.Tensor:
        return pool_grid(low_res, self.pool)

    def num_tokens(self, n_low_res: int) -> int:
        """Visual tokens per image view given N low-res tokens (N / pool^2)."""
        return n_low_res // (self.pool * self.pool)


def build_connector(
    cfg: ConnectorConfig, vision_dim: int, llm_dim: int, aux_dim: int | None = None
) -> Connector:
    connector = CONNECTORS.get(cfg.type)(cfg, vision_dim, llm_dim, aux_dim)
    connector.pool = cfg.pool
    return connector
