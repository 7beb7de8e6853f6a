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


def lr_scale_groups(model, params: list[nn.Parameter], stage: StageConfig) -> list[dict]:
    """`params` split into AdamW param groups: the stage's lr for those no `stage.lr_scale`
    component holds, then one group per scale (lr = stage.lr * scale), in a fixed order so a
    resumed optimizer state matches."""
    if model is None:
        raise ConfigError(f"training.stages.{stage.name}.lr_scale: needs the model to find its components")
    scale_of: dict[int, float] = {}
    for comp, scale in stage.lr_scale.items():
        for n, p in component_parameters(model, comp):
            if scale_of.setdefault(id(p), scale) != scale:
                raise ConfigError(f"training.stages.{stage.name}.lr_scale: {n} is in components with "
                                  f"different scales ({scale_of[id(p)]} and {scale})")
    by_scale: dict[float, list[nn.Parameter]] = {}
    for p in params:
        by_scale.setdefault(scale_of.get(id(p), 1.0), []).append(p)
    groups = [{"params": by_scale.pop(1.0, [])}]
    groups += [{"params": ps, "lr": stage.lr * s} for s, ps in sorted(by_scale.items())]
    for g in groups[1:]:
        log.info("stage %s: %s parameters at lr %.3g", stage.name,
                 f"{sum(p.numel() for p in g['params']):,}", g["lr"])
    return [g for g in groups if g["params"]]


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
