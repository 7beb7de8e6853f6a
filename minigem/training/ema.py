"""An exponential moving average of a stage's trainable weights (Polyak averaging).

A stage with ``ema_decay: d`` keeps, next to the weights the optimiser updates, a float32
average ``a <- a + (1 - d_t) * (w - a)`` after every optimiser step, and ends with the
averaged weights in place of the last ones. ``d_t = min(d, (1 + t) / (10 + t))`` for the t-th
update: early updates weigh more, so a short stage is not dominated by the weights it started
from (the warm-up timm's ``ModelEmaV2`` and TensorFlow's ``ExponentialMovingAverage`` use).

Mid-stage checkpoints keep the raw weights (training resumes from them) and put the average
in the trainer state, so an interrupted and resumed stage ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from minigem.errors import CheckpointError

log = logging.getLogger(__name__)


class WeightAverage:
    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    @classmethod
    def for_stage(cls, params: Sequence[torch.nn.Parameter], decay: float | None,
                  state: dict[str, Any] | None) -> WeightAverage | None:
        """The stage's average (None without ``ema_decay``), restored from a mid-stage trainer
        state when it holds one."""
        if decay is None:
            return None
        avg = cls(params, decay)
        if state is not None and state.get("ema") is not None:
            avg.load_state_dict(state["ema"])
        return avg

    def current_decay(self) -> float:
        """The decay used by the next update."""
        t = self.updates + 1
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for avg, p in zip(self.shadow, self.params, strict=True):
            avg.lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Replace the trainable weights by their average (cast to each weight's dtype)."""
        for avg, p in zip(self.shadow, self.params, strict=True):
            p.copy_(avg.to(p.dtype))

    def finish(self, stage: str) -> None:
        """End of the stage: the trainable weights become their average."""
        self.copy_to_params()
        log.info("stage %s ends with the moving average of its weights (decay %g, %d updates)",
                 stage, self.decay, self.updates)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if [a.shape for a in shadow] != [a.shape for a in self.shadow]:
            raise CheckpointError("the checkpoint's weight average does not match this stage's trainable "
                                  f"weights ({len(shadow)} tensors saved, {len(self.shadow)} trainable)")
        self.updates = int(state["updates"])
        for dst, src in zip(self.shadow, shadow, strict=True):
            dst.copy_(src.to(dst.device))
