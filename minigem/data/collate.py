"""From `Sample`s to model batches: template rendering, tokenisation, image tensors, padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minigem.chat import IGNORE_INDEX, encode_segments, get_template
from minigem.data.records import Sample
from minigem.errors import DataError


@dataclass
class SampleEncoder:
    """Sample -> {input_ids, labels, pixel_values, pixel_values_aux} (unpadded)."""

    tokenizer: Any
    template_name: str
    processor: Any  # ImageProcessor
    image_token: str
    tokens_per_image: int
    max_length: int
    system: str | None = None

    @classmethod
    def for_model(cls, model, template: str | None = None) -> SampleEncoder:
        cfg = model.config
        return cls(model.tokenizer, template or cfg.template, model.processor, cfg.image_token,
                   model.tokens_per_image, cfg.max_length, cfg.system_prompt)

    def __post_init__(self) -> None:
        self.template = get_template(self.template_name)

    def __call__(self, sample: Sample) -> dict[str, Any]:
        n_ph = sum(m.content.count(self.image_token) for m in sample.messages)
        if n_ph != len(sample.images):
            raise DataError(
                f"{sample.source or 'data'}: record {sample.id}: {n_ph} {self.image_token} "
                f"placeholders but {len(sample.images)} images"
            )
        try:
            segs = self.template.render(sample.messages, system=self.system, tokenizer=self.tokenizer)
            ids, labels = encode_segments(self.tokenizer, segs, self.image_token,
                                          self.tokens_per_image, self.max_length)
        except DataError as err:
            raise DataError(f"{sample.source or 'data'}: record {sample.id}: {err}") from None
        pix = self.processor(sample.images)
        return {"input_ids": ids, "labels": labels, **pix, "category": sample.category}


def collate(batch: list[dict[str, Any]], pad_id: int, left: bool = False) -> dict[str, Any]:
    """Pad to the longest row (right padding for training; left for generation)."""
    width = max(len(b["input_ids"]) for b in batch)
    n = len(batch)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        sl = slice(width - k, width) if left else slice(0, k)
        ids[i, sl] = torch.tensor(b["input_ids"])
        labels[i, sl] = torch.tensor(b["labels"])
        mask[i, sl] = 1
    out: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    for key in ("pixel_values", "pixel_values_aux"):
        parts = [b[key] for b in batch if b.get(key) is not None]
        out[key] = torch.cat(parts) if parts else None
    return out
