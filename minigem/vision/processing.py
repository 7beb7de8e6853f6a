"""Image preprocessing: PIL images -> normalised pixel tensors for the towers.

LLaVA `pad` expands an image to a square with the mean colour before resizing; `square`
resizes directly. With a high-res tower (Mini-Gemini) each image also yields an HR tensor
and, in HD mode, several LR views (see ``minigem.vision.hd``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from minigem.config import ModelConfig
from minigem.errors import DataError


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of the mean colour (LLaVA `pad`)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def to_tensor(image: Image.Image, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """RGB PIL -> normalised [3, H, W] float32."""
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = (arr - mean) / std
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


@dataclass
class ImageProcessor:
    """Turns a list of PIL images into the towers' inputs.

    Returns ``pixel_values`` [n_images * views, 3, S, S] and, with a high-res tower,
    ``pixel_values_aux`` [n_images, 3, S_hr, S_hr].
    """

    image_size: int
    aspect: str = "pad"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    hr_size: int | None = None
    grid: int = 1
    global_view: bool = False

    @classmethod
    def from_config(cls, cfg: ModelConfig, image_size: int) -> ImageProcessor:
        aux = cfg.vision_aux
        return cls(
            image_size=image_size,
            aspect=cfg.vision.image_aspect,
            mean=cfg.vision.image_mean,
            std=cfg.vision.image_std,
            hr_size=aux.image_size if aux else None,
            grid=aux.image_grid if aux else 1,
            global_view=aux.image_global if aux else False,
        )

    @property
    def views_per_image(self) -> int:
        return self.grid * self.grid + int(self.global_view) if self.grid > 1 else 1

    @property
    def mean_rgb(self) -> tuple[int, int, int]:
        r, g, b = (int(round(m * 255)) for m in self.mean)
        return (r, g, b)

    def load(self, image: Image.Image, where: str = "image") -> Image.Image:
        """Decode fully and convert to RGB, with a clear error for broken files."""
        try:
            image.load()
            rgb = image.convert("RGB")
        except (OSError, ValueError) as err:
            raise DataError(f"{where}: cannot read image: {err}") from None
        if rgb.width < 1 or rgb.height < 1:
            raise DataError(f"{where}: empty image ({rgb.width}x{rgb.height})")
        return rgb

    def __call__(self, images: list[Image.Image]) -> dict[str, torch.Tensor | None]:
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        if not images:
            return {"pixel_values": None, "pixel_values_aux": None}
        if self.hr_size is not None:
            from minigem.vision.hd import mgm_views

            lrs, hrs = [], []
            for img in images:
                lr, hr = mgm_views(
                    self.load(img), self.image_size, self.hr_size, self.grid, self.global_view,
                    self.aspect, self.mean, self.std,
                )
                lrs.append(lr)
                hrs.append(hr)
            return {"pixel_values": torch.cat(lrs), "pixel_values_aux": torch.stack(hrs)}
        out = []
        for img in images:
            img = self.load(img)
            if self.aspect == "pad":
                img = pad_to_square(img, self.mean_rgb)
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            out.append(to_tensor(img, mean, std))
        return {"pixel_values": torch.stack(out), "pixel_values_aux": None}
