"""Chat that may answer with a picture: ``<GEN>`` in, ``<h>`` prompt out, image generated.

``chat_with_image`` is what ``VisionLanguageModel.chat(..., generate_image=True)`` runs:
the last user turn gets ``<GEN>``, the model answers, the last ``<h>...</h>`` span of the
answer goes to an ``ImageGenerator`` (a ``DiffusionBridge`` unless told otherwise), and a
``ChatResult`` carries the answer without markers, the prompt and the images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from minigem.data.records import Message
from minigem.imagegen.markers import (
    add_gen_marker,
    add_gen_marker_to_messages,
    extract_prompt,
    strip_markers,
)


@runtime_checkable
class ImageGenerator(Protocol):
    def generate(self, prompt: str, n: int = 1, size: tuple[int, int] | None = None,
                 seed: int | None = None) -> list[Image.Image]:
        """``n`` images for ``prompt`` (``size`` = (width, height), None = the default)."""
        ...


@dataclass
class ChatResult:
    text: str  # the answer without markers
    prompt: str | None  # the image prompt (the last <h> span); None when the model wrote none
    images: list[Image.Image] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text


def as_generator(image_pipeline: str | os.PathLike[str] | ImageGenerator | None) -> ImageGenerator:
    """A pipeline directory (None: the bundled one) as a DiffusionBridge; a generator as is."""
    if image_pipeline is None or isinstance(image_pipeline, str | os.PathLike):
        from minigem.imagegen.bridge import DiffusionBridge

        return DiffusionBridge(None if image_pipeline is None else Path(image_pipeline))
    return image_pipeline


def ask_for_image(prompt: str | list[Message]) -> str | list[Message]:
    """The request with ``<GEN>`` ending its (last) user turn."""
    return add_gen_marker(prompt) if isinstance(prompt, str) else add_gen_marker_to_messages(prompt)


def answer_with_image(answer: str, generator: ImageGenerator,
                      image_options: Mapping[str, Any] | None = None) -> ChatResult:
    """Draw the answer's image prompt, if it has one.

    ``image_options``: ``n``, ``size`` and ``seed``, and for a ``DiffusionBridge`` also
    ``steps``, ``guidance`` and ``negative_prompt``.
    """
    prompt = extract_prompt(answer)
    images = generator.generate(prompt, **dict(image_options or {})) if prompt else []
    return ChatResult(strip_markers(answer), prompt, images)


def chat_with_image(model, images: Image.Image | list[Image.Image] | None,
                    prompt: str | list[Message],
                    image_pipeline: str | os.PathLike[str] | ImageGenerator | None = None,
                    image_options: Mapping[str, Any] | None = None,
                    **gen_kwargs: Any) -> ChatResult:
    """Ask ``model`` for an image about ``images`` and ``prompt``; see ``answer_with_image``.

    The pipeline is checked before the model runs, so a bad directory fails fast.
    """
    generator = as_generator(image_pipeline)
    answer = model.chat_batch([(images, ask_for_image(prompt))], **gen_kwargs)[0]
    return answer_with_image(answer, generator, image_options)


def save_images(images: list[Image.Image], out_dir: str | Path, prefix: str = "minigem") -> list[Path]:
    """Save PNGs as ``out_dir/{prefix}-NNNN.png`` (the next free numbers); their paths."""
    folder = Path(out_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    k = 1
    for image in images:
        while (folder / f"{prefix}-{k:04d}.png").exists():
            k += 1
        path = folder / f"{prefix}-{k:04d}.png"
        image.save(path, format="PNG")
        paths.append(path)
    return paths
