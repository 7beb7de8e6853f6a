"""What trains in a stage: components by name -> parameters; freezing everything else."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from torch import nn

from minigem.config import StageConfig
from minigem.errors import ConfigError

log = logging.getLogger(__name__)


def component_parameters(model, name: str) -> Iterator[tuple[str, nn.Parameter]]:
    """Named parameters of one component of a VisionLanguageModel."""
    if name == "vision":
        yield from model.vision_tower.named_parameters(prefix="vision_tower")
    elif name == "vision_aux":
        if model.vision_tower_aux is None:
            raise ConfigError("stage trains 'vision_aux' but the model has no high-res tower")
        yield from model.vision_tower_aux.named_parameters(prefix="vision_tower_aux")
    elif name == "connector":
        yield from model.connector.named_parameters(prefix="connector")
    elif name == "projector":
        proj = getattr(model.connector, "projector", None)
        if proj is None:
            raise ConfigError("stage trains 'projector' but the connector has none")
        yield from proj.named_parameters(prefix="connector.projector")
    elif name == "mining":
        found = False
        for n, p in model.connector.named_parameters(prefix="connector"):
            if not n.startswith("connector.projector.") and n != "connector.pos_embed":
                found = True
                yield n, p
        if not found:
            raise ConfigError("stage trains 'mining' but the connector has no mining layers")
    elif name == "llm":
        yield from model.language_model.named_parameters(prefix="language_model")
    elif name == "moe":
        from minigem.llm.moe import moe_parameters

        params = list(moe_parameters(model.language_model))
        if not params:
            raise ConfigError("stage trains 'moe' but the model has no MoE layers")
        for n, p in params:
            yield f"language_model.{n}", p
    else:  # pragma: no cover - guarded by the config Literal
        raise ConfigError(f"unknown component {name!r}")


def apply_stage(model, stage: StageConfig) -> int:
    """Freeze everything, unfreeze the stage's components; return the trainable count."""
    if not stage.use_hr and not model.has_hr_path:
        raise ConfigError(f"training.stages.{stage.name}.use_hr: false runs a Mini-Gemini as its LR-only "
                          "LLaVA; this model has no high-res path to leave out")
    model.use_hr = stage.use_hr
    for p in model.parameters():
        p.requires_grad_(False)
    for comp in stage.train:
        for _, p in component_parameters(model, comp):
            p.requires_grad_(True)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("stage %s: training %s (%s of %s parameters)%s", stage.name, ", ".join(stage.train),
             f"{n:,}", f"{total:,}", "" if stage.use_hr else ", high-res path off")
    model.train()
    return n
