"""Mini-Gemini image views: the HR image, its LR view(s), and the HD token-extension split.

One image gives an HR tensor [3, hr, hr] for the ConvNeXt tower and V LR views
[V, 3, lr, lr] for the CLIP tower, V = grid^2 + global_view (1 without HD):

- ``pad`` expands the image to a square with the mean colour (LLaVA ``expand2square``,
  colour ``int(mean * 255)``); ``square`` resizes it directly (aspect ratio not kept).
- HR: bicubic resize to hr x hr (as the CLIP image processor at ``image_size_aux``).
- LR: a bilinear downscale of the normalised HR tensor (``align_corners=False``, no
  antialias, as the release does) to (grid * lr)^2; with grid > 1 it is cut into a
  grid x grid set of lr crops, and the global view is a further bilinear downscale of
  the (grid * lr) image to lr. View order: [global, crop(0,0), crop(0,1), ..., crop(g-1,g-1)].

``split_hr_views`` cuts the HR feature map the same way, so view v of the LR tokens and
view v of the HR map cover the same part of the image: crops are the grid split, the
global view the map downscaled by ``grid`` with bilinear interpolation
(``align_corners=False``; for grid 2 this equals 2x2 average pooling), as in the release.

Images of any size >= 1x1 are accepted (small ones are upscaled); an empty image, or
sizes that do not divide, are errors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_CHANNEL_CHUNK = 256  # channels resized at a time in split_hr_views (bounds the fp32 temporary)


def views_per_image(grid: int, global_view: bool) -> int:
    """V = grid^2 (+1 with a global view); 1 without HD."""
    _check_grid(grid, global_view)
    return grid * grid + int(global_view)


def _check_grid(grid: int, global_view: bool) -> None:
    if grid < 1:
        raise ValueError(f"image grid must be >= 1, got {grid}")
    if global_view and grid < 2:
        raise ValueError("a global view needs image_grid >= 2 (HD mode); got image_grid=1")


def mgm_views(
    image: Image.Image,
    lr_size: int,
    hr_size: int,
    grid: int = 1,
    global_view: bool = False,
    aspect: str = "pad",
    mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
    std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL image -> (LR views [V, 3, lr, lr], HR [3, hr, hr]), both normalised float32."""
    _check_grid(grid, global_view)
    if lr_size < 1 or hr_size < 1:
        raise ValueError(f"image sizes must be positive; got lr_size={lr_size}, hr_size={hr_size}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"empty image ({image.width}x{image.height}); need at least 1x1 pixels")
    if aspect not in ("pad", "square"):
        raise ValueError(f"unknown image aspect {aspect!r}; valid: pad, square")
    image = image.convert("RGB")
    if aspect == "pad" and image.width != image.height:
        side = max(image.width, image.height)
        fill = tuple(int(m * 255) for m in mean)  # LLaVA expand2square background
        canvas = Image.new("RGB", (side, side), fill)  # type: ignore[arg-type]
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    image = image.resize((hr_size, hr_size), Image.Resampling.BICUBIC)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    hr = torch.from_numpy(arr.transpose(2, 0, 1).copy())  # [3, hr, hr]

    big = lr_size * grid
    lr = F.interpolate(hr[None], size=(big, big), mode="bilinear", align_corners=False)
    if grid == 1:
        return lr, hr  # [1, 3, lr, lr]
    # [1, 3, g*lr, g*lr] -> [g*g, 3, lr, lr], crops in row-major order
    crops = lr.view(3, grid, lr_size, grid, lr_size).permute(1, 3, 0, 2, 4)
    crops = crops.reshape(grid * grid, 3, lr_size, lr_size)
    views = [crops]
    if global_view:
        glob = F.interpolate(lr, size=(lr_size, lr_size), mode="bilinear", align_corners=False)
        views.insert(0, glob)
    return torch.cat(views), hr


def write_views(
    out: torch.Tensor, full: torch.Tensor, c0: int, grid: int, global_view: bool
) -> None:
    """Write channels [c0, c0 + c) of every view of ``full`` into ``out``.

    full: [B, c, H, W] (a channel slice of an HR map); out: [B, V, C, H/grid, W/grid].
    View 0 is the global view (bilinear halving in fp32) when ``global_view``; then the
    grid crops in row-major order (crop (r, c) at index global_view + r * grid + c).
    """
    b, c, h, w = full.shape
    hh, ww = h // grid, w // grid
    first = int(global_view)
    if grid == 1:
        out[:, 0, c0 : c0 + c] = full
        return
    crops = full.view(b, c, grid, hh, grid, ww).permute(0, 2, 4, 1, 3, 5)  # [B, g, g, c, h, w]
    out[:, first:, c0 : c0 + c].view(b, grid, grid, c, hh, ww).copy_(crops)
    if global_view:
        small = F.interpolate(full.float(), size=(hh, ww), mode="bilinear", align_corners=False)
        out[:, 0, c0 : c0 + c] = small


def empty_views(
    like: torch.Tensor, channels: int, h: int, w: int, grid: int, global_view: bool
) -> torch.Tensor:
    """The output of a split: [B, V, channels, h/grid, w/grid], after checking the sizes."""
    v = views_per_image(grid, global_view)
    if h % grid or w % grid:
        raise ValueError(f"HR map {h}x{w} cannot be split into a {grid}x{grid} grid")
    return like.new_empty(like.shape[0], v, channels, h // grid, w // grid)


def split_hr_views(hr_map: torch.Tensor, grid: int, global_view: bool) -> torch.Tensor:
    """HR map [B, C, H, W] -> [B*V, C, H/grid, W/grid], per image [global, crops...].

    The identity for grid 1. Works a few channels at a time, so the only large allocation
    is the output (the map itself stays alive: see ``HRTower.forward(grid=...)``, which
    writes the views directly and never holds the whole map).
    """
    _check_grid(grid, global_view)
    if grid == 1:
        return hr_map
    b, c, h, w = hr_map.shape
    out = empty_views(hr_map, c, h, w, grid, global_view)
    for c0 in range(0, c, _CHANNEL_CHUNK):
        write_views(out, hr_map[:, c0 : c0 + _CHANNEL_CHUNK], c0, grid, global_view)
    return out.flatten(0, 1)  # [B*V, C, H/grid, W/grid]
