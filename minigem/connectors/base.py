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


def pool_grid(tokens: torch.Tensor, k: int, mode: str = "avg") -> torch.Tensor:
    """Pool a square grid of tokens k x k (row-major): `avg` [B, N, C] -> [B, N / k^2, C];
    `concat` (space-to-depth) [B, N, C] -> [B, N / k^2, k^2 C], the block's features in
    row-major order."""
    if k == 1:
        return tokens
    b, n, c = tokens.shape
    side = math.isqrt(n)
    if side * side != n or side % k:
        raise ValueError(
            f"connector pool={k} needs a square grid of low-res tokens with a side divisible by "
            f"{k}; got N={n} (select_feature cls_patch adds a CLS token: use `patch`)"
        )
    if mode == "concat":
        s = side // k
        blocks = tokens.reshape(b, s, k, s, k, c).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(b, s * s, k * k * c)
    if mode != "avg":
        raise ValueError(f"unknown pool mode {mode!r}; valid: avg, concat")
    grid = tokens.transpose(1, 2).reshape(b, c, side, side)
    return F.avg_pool2d(grid, k).flatten(2).transpose(1, 2)


class Connector(nn.Module):
    """Base class: ``forward(VisionFeatures) -> [B, T, D_llm]``.

    ``pool`` / ``pool_mode`` (ConnectorConfig) pool the low-res grid k x k first, and
    ``pos_embed`` (a learned [T, C_in] parameter, or None) is then added to every view."""

    pool: int = 1
    pool_mode: str = "avg"

    def __init__(self) -> None:
        super().__init__()
        self.pos_embed: nn.Parameter | None
        self.register_parameter("pos_embed", None)

    def forward(self, feats: VisionFeatures):  # pragma: no cover - interface
        raise NotImplementedError

    def pooled(self, low_res: torch.Tensor) -> torch.Tensor:
        out = pool_grid(low_res, self.pool, self.pool_mode)
        if self.pos_embed is not None:
            if tuple(out.shape[1:]) != tuple(self.pos_embed.shape):
                raise ValueError(
                    f"connector pos_embed is {tuple(self.pos_embed.shape)} (tokens, channels) but "
                    f"the pooled low-res features are {tuple(out.shape[1:])}"
                )
            out = out + self.pos_embed.to(out.dtype)
        return out

    def num_tokens(self, n_low_res: int) -> int:
        """Visual tokens per image view given N low-res tokens (N / pool^2)."""
        return n_low_res // (self.pool * self.pool)


def connector_in_dim(cfg: ConnectorConfig, vision_dim: int) -> int:
    """Channels of a pooled low-res token: C, or k^2 C with `pool_mode: concat`."""
    return vision_dim * cfg.pool * cfg.pool if cfg.pool_mode == "concat" else vision_dim


def build_connector(
    cfg: ConnectorConfig, vision_dim: int, llm_dim: int, aux_dim: int | None = None,
    num_low_res: int | None = None,
) -> Connector:
    """`num_low_res` (the tower's N per view) is needed only with `pos_embed`."""
    in_dim = connector_in_dim(cfg, vision_dim)
    connector = CONNECTORS.get(cfg.type)(cfg, in_dim, llm_dim, aux_dim)
    connector.pool, connector.pool_mode = cfg.pool, cfg.pool_mode
    if cfg.pos_embed:
        if num_low_res is None:
            raise ValueError("connector pos_embed needs the number of low-res tokens per view")
        connector.pos_embed = nn.Parameter(torch.randn(connector.num_tokens(num_low_res), in_dim))
    return connector
