"""Chat: conversation templates, prompt/label encoding with image placeholders, tokenizers.

``get_template(name).render(messages)`` -> ``list[Segment]`` (text + trainable flag);
``encode_segments(tokenizer, segments, ...)`` -> ``(input_ids, labels)``.
"""

from minigem.chat.encode import count_images, encode_segments
from minigem.chat.templates import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    TEMPLATES,
    Segment,
    Template,
    check_conversation,
    get_template,
)
from minigem.chat.tokenizer import SPECIAL_TOKENS, ensure_special_tokens, train_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "SPECIAL_TOKENS",
    "TEMPLATES",
    "Segment",
    "Template",
    "check_conversation",
    "count_images",
    "encode_segments",
    "ensure_special_tokens",
    "get_template",
    "train_tokenizer",
]
