"""The hook for image generation (the generation bridge is not built yet).

A server is created with an optional ``ImageGenerator``. Without one, both ways of asking
for an image (``POST /v1/images/generations`` and ``modalities: ["text", "image"]`` on chat
completions) answer 400 ``image_generation_unavailable``. With one, the images endpoint
passes the prompt through, and a chat completion asking for an image passes the
assistant's answer (the bridge decides what to draw from it, e.g. its ``<h>...</h>`` span)
and returns the picture as a data: URL in ``message.images``.
"""

from __future__ import annotations

import base64
import io
from typing import Protocol

from PIL import Image

from minigem.serving.errors import bad_request

UNAVAILABLE = "image generation is not available for this model"


class ImageGenerator(Protocol):
    def generate(self, prompt: str, n: int = 1, size: tuple[int, int] | None = None,
                 seed: int | None = None) -> list[Image.Image]:
        """``n`` images for ``prompt`` (``size`` = (width, height), None = the default)."""
        ...


def unavailable(param: str | None = None):
    return bad_request(UNAVAILABLE, param, "image_generation_unavailable")


def parse_size(size: str | None) -> tuple[int, int] | None:
    if size is None or size == "auto":
        return None
    w, h = (int(v) for v in size.split("x"))
    if not (16 <= w <= 2048 and 16 <= h <= 2048):
        raise bad_request(f"size: {size} is outside 16x16 .. 2048x2048", "size")
    return w, h


def png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
