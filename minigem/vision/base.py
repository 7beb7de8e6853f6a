"""What every vision tower produces and every connector consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisionFeatures:
    """Features of a batch of images (one row per image view).

    low_res:  [B, N, C]        patch (or cls+patch) features of the low-res tower.
    high_res: [B, C_hr, H, W]  high-res feature map (Mini-Gemini), or None.
    """

    low_res: torch.Tensor
    high_res: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return self.low_res.shape[0]
