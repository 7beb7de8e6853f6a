"""Training checkpoints: model + optimizer + scheduler + RNG + position, written atomically."""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigem.checkpoints.native import atomic_dir, write_model

log = logging.getLogger(__name__)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def trainer_state(stage: int, step: int, history: list[dict], optimizer=None, sched=None, ema=None,
                  **extra: Any) -> dict[str, Any]:
    """What trainer_state.pt holds: the position, RNG, log history, optimiser state (as the
    engine gives it: `minigem.training.engines.optimizer_state`), schedule and weight average
    (None where the stage has none, and at a stage boundary)."""
    return {"stage": stage, "step": step, "rng": rng_state(), "history": history,
            "optimizer": optimizer,
            "scheduler": sched.state_dict() if sched is not None else None,
            "ema": ema.state_dict() if ema is not None else None, **extra}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _stage_step(path: Path) -> tuple[int, int]:
    """(stage, step) of a checkpoints/stage{i}-step{s} directory, for ordering (stage10 > stage9)."""
    stage, step = path.name.removeprefix("stage").split("-step")
    return int(stage), int(step)


def save_checkpoint(output_dir: str | Path, model, trainer_state: dict[str, Any], keep: int = 2,
                    write=write_model, keep_boundaries: bool = False) -> Path:
    """Write checkpoints/stage{i}-step{s}/ atomically, then point checkpoints/latest at it.

    Older checkpoints beyond the newest `keep` are removed, except stage boundaries (step 0: the
    weights a stage starts from) when keep_boundaries.
    write(model, directory) writes the weights (default: a native VLM checkpoint)."""
    root = checkpoint_root(output_dir)
    name = f"stage{trainer_state['stage']}-step{trainer_state['step']:07d}"
    dst = root / name
    with atomic_dir(dst) as tmp:
        write(model, tmp)
        torch.save(trainer_state, tmp / "trainer_state.pt")
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / "latest")
    olds = sorted((p for p in root.glob("stage*-step*") if p.is_dir() and p.name != name),
                  key=_stage_step)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        if not (keep_boundaries and _stage_step(p)[1] == 0):
            shutil.rmtree(p, ignore_errors=True)
    return dst


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoint_root(output_dir)
    ptr = root / "latest"
    if not ptr.is_file():
        return None
    path = root / ptr.read_text().strip()
    return path if (path / "trainer_state.pt").is_file() else None


def resume_point(output_dir: str | Path,
                 logger: logging.Logger = log) -> tuple[Path, dict[str, Any]] | None:
    """For --resume: the latest checkpoint under ``output_dir`` and its trainer state.

    None, with a warning on ``logger`` (the trainer's), when there is no checkpoint yet."""
    ckpt = latest_checkpoint(output_dir)
    if ckpt is None:
        logger.warning("--resume: no checkpoint in %s; starting from scratch", output_dir)
        return None
    return ckpt, torch.load(ckpt / "trainer_state.pt", weights_only=False)
