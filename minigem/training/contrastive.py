"""A CLIP-style `contrastive` stage: pretrain the vision towers on image-caption pairs.

A small text encoder (HF CLIPTextModel) and two linear heads exist only for this stage;
the towers named in the stage's `train` list learn features that tell scenes apart by
their captions, the same way CLIP's ViT was pretrained before LLaVA used it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from minigem.config import ContrastiveConfig
from minigem.data.records import Sample
from minigem.errors import DataError


class ContrastiveHeads(nn.Module):
    """Text encoder + projections + temperature; the VLM's towers are passed in at call time."""

    def __init__(self, cfg: ContrastiveConfig, vocab_size: int, image_dim: int, pad_id: int) -> None:
        super().__init__()
        tcfg = CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_text_tokens, pad_token_id=pad_id,
            bos_token_id=pad_id, eos_token_id=pad_id,  # unused: we mean-pool
        )
        self.text = CLIPTextModel(tcfg)
        self.image_proj = nn.Linear(image_dim, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)))

    def forward(self, image_feats: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_feats [B, C_img] pooled; text ids [B, L] -> (loss, image->text top-1 acc)."""
        h = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, W]
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        txt = (h * m).sum(1) / m.sum(1).clamp(min=1)  # [B, W]
        img = F.normalize(self.image_proj(image_feats), dim=-1)  # [B, E]
        txt = F.normalize(self.text_proj(txt), dim=-1)  # [B, E]
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T  # [B, B]
        target = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        acc = (logits.argmax(-1) == target).float().mean()
        return loss, acc


def pooled_image_features(model, batch: dict[str, Any], towers: list[str],
                          pool: str = "mean") -> torch.Tensor:
    """Features of the chosen towers pooled over positions (`mean` or `max`), concatenated:
    [B, C (+ C_hr)]."""
    if pool not in ("mean", "max"):
        raise ValueError(f"contrastive pool must be 'mean' or 'max', got {pool!r}")
    parts = []
    n = batch["input_ids"].shape[0]
    if "vision" in towers or "vision_aux" not in towers:
        low = model.vision_tower(batch["pixel_values"])  # [B*V, N, C]
        low = low.reshape(n, -1, low.shape[-1])
        parts.append(low.mean(1) if pool == "mean" else low.amax(1))
    if "vision_aux" in towers:
        high = model.vision_tower_aux(batch["pixel_values_aux"]).flatten(2)  # [B, C_hr, h*w]
        parts.append(high.mean(2) if pool == "mean" else high.amax(2))
    return torch.cat(parts, -1)


def image_feature_dim(model, towers: list[str]) -> int:
    dim = 0
    if "vision" in towers or "vision_aux" not in towers:
        dim += model.vision_tower.hidden_size
    if "vision_aux" in towers:
        dim += model.vision_tower_aux.out_channels
    return dim


class CaptionEncoder:
    """Sample -> {input_ids (caption tokens), pixel tensors}: first image, last answer."""

    def __init__(self, tokenizer, processor, max_tokens: int) -> None:
        self.tokenizer, self.processor, self.max_tokens = tokenizer, processor, max_tokens

    def __call__(self, sample: Sample) -> dict[str, Any]:
        if not sample.images:
            raise DataError(f"{sample.source or 'data'}: record {sample.id}: a contrastive stage needs an image")
        text = next(m.content for m in reversed(sample.messages) if m.role == "assistant")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_tokens]
        pix = self.processor(sample.images[:1])
        return {"input_ids": ids, "labels": ids, **pix, "category": sample.category}
