"""Image generation in the server (the generator itself is ``minigem.imagegen``).

A server is created with an optional ``ImageGenerator`` (``minigem serve`` attaches a
``DiffusionBridge``). Without one, both ways of asking for an image
(``POST /v1/images/generations`` and ``modalities: ["text", "image"]`` on chat completions)
answer 400 ``image_generation_unavailable``. With one, the images endpoint passes the
prompt straight through; a chat completion asking for an image ends the last user turn in
``<GEN>``, draws the last ``<h>...</h>`` span of the answer, and returns the answer without
markers plus the picture as a data: URL in ``message.images`` (none when the model wrote no
span).
"""

from __future__ import annotations

import base64
import io

from PIL import Image

from minigem.imagegen.chat import ImageGenerator
from minigem.serving.errors import bad_request

__all__ = ["ImageGenerator", "UNAVAILABLE", "parse_size", "png_base64", "unavailable"]

UNAVAILABLE = "image generation is not available for this model"


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
