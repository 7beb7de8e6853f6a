"""Connectors: VisionFeatures -> visual tokens [B, T, D_llm], all with one signature.

A connector is built by ``build_connector(cfg, vision_dim, llm_dim, aux_dim)`` from the
registry ``CONNECTORS``; each takes ``VisionFeatures`` and returns ``[B, T, D_llm]`` and
reports ``num_tokens(n_low_res_tokens)``.
"""

from minigem.connectors import (
    mlp,  # noqa: F401  (registers linear, mlp2x_gelu)
    patch_mining,  # noqa: F401  (registers patch_mining)
)
from minigem.connectors.base import CONNECTORS, Connector, build_connector

__all__ = ["CONNECTORS", "Connector", "build_connector"]
