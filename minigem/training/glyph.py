"""A `glyph` stage: teach the HR tower and the patch mining to pass on what is written in a cell.

The synthetic world knows which glyph each object carries and which grid cell it is in. This stage
draws scenes with glyphs (a fresh scene per index, deterministic), runs both towers and the mining
(`connector.mine`: each LR token plus what it mined from its own HR sub-region), and a linear head,
which exists only for this stage, reads each glyphed object's glyph from the token of its cell
(cross-entropy, chance 1/16). What trains is the stage's `train` list, usually
`[vision_aux, mining]`. With `glyph: {read: projector, keep_weight: w}` the head reads the
projector's output instead (what the LLM sees) and the stage trains `[mining, projector]`, keeping
the projector's output near what an LLM trained without the HR path saw (`GlyphHead`).

Why it exists (docs/mini-gemini.md, sixth to twelfth sessions): under the LM loss alone the
single-head mining never learned to pass a 5x7 px glyph on, even from an HR tower that reads
glyphs; trained against this per-object target it does, and the LLM then learns to read the
mined detail. It stands in for what real MGM gets from a large pretrained ConvNeXt and 1.2M
instructions. Needs a Mini-Gemini model (non-HD) whose connector gives one visual token per cell
of the world's 3 x 3 grid.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from minigem.config import SynthConfig
from minigem.data.synth import GLYPHS, make_scene, render, render_size
from minigem.errors import ConfigError
from minigem.vision.base import VisionFeatures

GRID = 9  # the world's 3 x 3 cells, row-major


class GlyphScenes(Dataset):
    """Scene i of `cfg.seed`, each with at least one glyph, processed for the model:
    {pixel_values, pixel_values_aux, glyphs [1, 9]} with the glyph id of each cell (-1: none)."""

    def __init__(self, cfg: SynthConfig, processor) -> None:
        self.cfg, self.processor = cfg, processor

    def __len__(self) -> int:
        return self.cfg.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene = make_scene(random.Random(f"minigem-glyph/{self.cfg.seed}/{i}"), need_glyph=True)
        glyphs = torch.full((1, GRID), -1, dtype=torch.long)
        for obj in scene.objects:
            if obj.glyph is not None:
                glyphs[0, obj.cell] = GLYPHS.index(obj.glyph)
        side = render_size(self.cfg.image_size, self.cfg.seed, i)
        return {**self.processor([render(scene, side)]), "glyphs": glyphs}


def collate_glyphs(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batch]) for k in ("pixel_values", "pixel_values_aux", "glyphs")}


def check_model(model, stage_name: str) -> None:
    """A clear error where the model cannot take a `glyph` stage."""
    where = f"training.stages.{stage_name}"
    if model.vision_tower_aux is None or not hasattr(model.connector, "mine"):
        raise ConfigError(f"{where}: a `glyph` stage needs a Mini-Gemini model (vision_aux + "
                          "connector.type patch_mining)")
    if model.processor.views_per_image != 1:
        raise ConfigError(f"{where}: a `glyph` stage needs one view per image (HD mode has "
                          f"{model.processor.views_per_image})")
    tokens = model.tokens_per_image
    if tokens != GRID:
        raise ConfigError(f"{where}: a `glyph` stage reads one visual token per cell of the world's "
                          f"3 x 3 grid; this model has {tokens} per image (set connector.pool so that "
                          f"the LR grid pools to 3 x 3)")


class GlyphHead(nn.Module):
    """Linear glyph classifier on each glyphed cell's token; `forward` gives (loss, accuracy).

    read "mined": the token is the LR token plus its mined detail (`connector.mine`). read
    "projector": the projector's output for it, what the LLM sees; with keep_weight > 0 the loss
    adds keep_weight x the relative MSE between that output, on every cell, and the output of the
    projector as the stage found it for the LR token alone (`connector.lr_only`): the glyph is
    pushed through the projector while what an LLM trained on the LR-only tokens sees moves as
    little as it can. The starting projector is kept here, frozen, so a resumed stage keeps the
    same target.
    """

    def __init__(self, model, read: str = "mined", keep_weight: float = 0.0) -> None:
        super().__init__()
        self.read, self.keep_weight = read, keep_weight
        conn = model.connector
        if read == "projector":
            dim = model.language_model.config.hidden_size
            self.start = copy.deepcopy(conn.projector).requires_grad_(False) if keep_weight > 0 else None
        else:
            dim, self.start = conn.vision_dim, None
        self.head = nn.Linear(dim, len(GLYPHS))

    def forward(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        low = model.vision_tower(batch["pixel_values"])  # [B, N, C]
        high = model.vision_tower_aux(batch["pixel_values_aux"].to(low.dtype))
        tokens = model.connector.mine(VisionFeatures(low, high))  # [B, 9, C]
        if self.read == "projector":
            tokens = model.connector.projector(tokens)  # [B, 9, D]
        target = batch["glyphs"].flatten()
        keep = target >= 0
        logits = self.head(tokens.flatten(0, 1)[keep].float())
        loss = F.cross_entropy(logits, target[keep])
        if self.start is not None:
            with torch.no_grad():
                want = self.start(model.connector.pooled(low)).float()
            loss = loss + self.keep_weight * F.mse_loss(tokens.float(), want) / want.pow(2).mean()
        acc = (logits.argmax(-1) == target[keep]).float().mean()
        return loss, acc


@torch.no_grad()
def held_out_accuracy(model, head: GlyphHead, cfg: SynthConfig, batch: int = 64) -> float:
    """Glyph accuracy of `head` over every glyphed object of `cfg`'s scenes (use another seed than
    the stage's data)."""
    scenes = GlyphScenes(cfg, model.processor)
    was_training = model.training
    model.eval()
    hits = total = 0
    device = next(head.parameters()).device
    for b0 in range(0, len(scenes), batch):
        b = collate_glyphs([scenes[i] for i in range(b0, min(b0 + batch, len(scenes)))])
        b = {k: v.to(device) for k, v in b.items()}
        _, acc = head(model, b)
        n = int((b["glyphs"] >= 0).sum())
        hits += acc.item() * n
        total += n
    model.train(was_training)
    return hits / max(1, total)
