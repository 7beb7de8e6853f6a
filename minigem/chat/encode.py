"""Segments -> (input_ids, labels): tokenise, expand image placeholders, mask, truncate.

Every segment is tokenised on its own with ``add_special_tokens=False``, so template markers
(``</s>``, ``<|eot_id|>``, ``<image>``...) must be special tokens of the tokenizer. Generation
prompts go through the same function, so training and inference see the same token
boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from minigem.chat.templates import IGNORE_INDEX, IMAGE_TOKEN, Segment
from minigem.data.records import Message
from minigem.errors import ConfigError, DataError


def count_images(messages: Sequence[Message], image_token: str = IMAGE_TOKEN) -> int:
    """Number of image placeholders across the conversation."""
    return sum(m.content.count(image_token) for m in messages)


def _image_token_id(tokenizer: Any, image_token: str) -> int:
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    tid = tokenizer.convert_tokens_to_ids(image_token)
    if len(ids) != 1 or ids[0] != tid or tid == tokenizer.unk_token_id:
        raise ConfigError(
            f"the image token {image_token!r} is not a single token of this tokenizer; add it with "
            "minigem.chat.ensure_special_tokens(tokenizer, [...]) and resize the model's embeddings"
        )
    return tid


def encode_segments(
    tokenizer: Any,
    segments: list[Segment],
    image_token: str = IMAGE_TOKEN,
    tokens_per_image: int | list[int] = 1,
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels (``IGNORE_INDEX`` on context and on every image token).

    Each image placeholder becomes ``tokens_per_image`` copies of the image token id (an int
    for all images, or one count per image in placeholder order). ``max_length`` cuts text
    from the end; it never cuts into or drops an image (DataError if the images don't fit).
    """
    if max_length is not None and max_length <= 0:
        raise ConfigError(f"max_length must be positive, got {max_length}")
    image_id = _image_token_id(tokenizer, image_token) if any(image_token in s.text for s in segments) else None

    ids: list[int] = []
    trainable: list[bool] = []
    for seg in segments:
        piece = tokenizer.encode(seg.text, add_special_tokens=False) if seg.text else []
        ids += piece
        trainable += [seg.trainable] * len(piece)

    n_images = ids.count(image_id) if image_id is not None else 0
    if isinstance(tokens_per_image, int):
        counts = [tokens_per_image] * n_images
    else:
        counts = list(tokens_per_image)
        if len(counts) != n_images:
            raise DataError(
                f"the prompt has {n_images} {image_token} placeholders but tokens_per_image "
                f"lists {len(counts)} counts"
            )
    if any(c < 1 for c in counts):
        raise ConfigError(f"tokens_per_image must be >= 1, got {tokens_per_image}")

    out_ids: list[int] = []
    labels: list[int] = []
    image_end = 0  # length of the sequence up to the end of the last image run
    k = 0
    for tid, train in zip(ids, trainable, strict=True):
        if tid == image_id:
            out_ids += [tid] * counts[k]
            labels += [IGNORE_INDEX] * counts[k]
            image_end = len(out_ids)
            k += 1
        else:
            out_ids.append(tid)
            labels.append(tid if train else IGNORE_INDEX)

    if max_length is not None and len(out_ids) > max_length:
        if image_end > max_length:
            raise DataError(
                f"the sequence needs {image_end} tokens to keep its {n_images} image(s) whole "
                f"but max_length is {max_length}"
            )
        out_ids, labels = out_ids[:max_length], labels[:max_length]
    return out_ids, labels
