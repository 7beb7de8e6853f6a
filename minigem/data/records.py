"""The in-memory form of one training/eval record, whatever file format it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

Role = Literal["system", "user", "assistant"]


@dataclass
class Message:
    role: Role
    content: str  # may contain `<image>` placeholders (user turns)


@dataclass
class Sample:
    """One conversation with its images, in placeholder order.

    ``images[k]`` belongs to the k-th ``<image>`` placeholder across the conversation.
    """

    id: str
    messages: list[Message]
    images: list[Image.Image] = field(default_factory=list)
    category: str | None = None
    source: str | None = None  # file the record came from (for error messages)


def text_length(messages: list[Message], tokens_per_image: int, image_token: str = "<image>") -> int:
    """A cheap proxy of a record's token count (for grouping batches by length): its words,
    each image placeholder counted as the `tokens_per_image` visual tokens it becomes."""
    words = sum(len(m.content.split()) for m in messages)
    images = sum(m.content.count(image_token) for m in messages)
    return words + images * (tokens_per_image - 1)
