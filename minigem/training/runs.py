"""Helpers for scripts that drive training runs through the CLI (ablations, sweeps)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def ablation_parser(description: str, *, base: str, base_help: str, recipe: str, recipe_help: str,
                    out: str, steps: int, lr: float, data_seed: int) -> argparse.ArgumentParser:
    """The options every ablation script shares: the starting checkpoint and recipe, where
    results go, the per-arm budget (steps, batch, lr), the training data seed, the test split
    size and the thread count. Scripts add their own on top."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--base", default=base, help=base_help)
    ap.add_argument("--recipe", default=recipe, help=recipe_help)
    ap.add_argument("--out", default=out)
    ap.add_argument("--steps", type=int, default=steps, help="optimiser steps per arm")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--data-seed", type=int, default=data_seed, help="synth seed of the training data")
    ap.add_argument("--n-test", type=int, default=1000, help="records in the test split")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--padding-free", action="store_true",
                    help="train every arm with `padding_free: true` (same loss, less compute on padding)")
    return ap


def require_base(base: str | Path, recipe: str | Path) -> Path:
    """The ablation's starting checkpoint, resolved; a clear exit, naming the recipe that trains
    it, when it is not a model directory."""
    path = Path(base).resolve()
    if not (path / "config.json").is_file():
        where = f" training.output_dir={path.parent}" if path.name == "final" else ""  # runs write DIR/final
        raise SystemExit(f"{path}: not a model directory (train the base first: minigem train {recipe}"
                         f"{where}, or give --base DIR)")
    return path


def run_cli(argv: list[str] | tuple[str, ...], threads: int, cwd: str | Path | None = None,
            script: str | Path | None = None) -> tuple[str, float]:
    """Run `python -m minigem.cli ARGV` (or `python SCRIPT ARGV`) with `threads` intra-op
    threads; return (stdout, wall s).

    Progress bars go to stderr as usual; a failing command raises SystemExit naming it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, *([str(script)] if script else ["-m", "minigem.cli"]), *argv]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(argv)}")
    return res.stdout, wall


def mean_samples_per_s(run: str | Path) -> float | None:
    """Mean of the `samples_per_s` entries of a run's metrics.jsonl (None if it has none)."""
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    return sum(rates) / len(rates) if rates else None


def train_recipe(recipe: dict, path: str | Path, threads: int, cwd: str | Path | None = None) -> tuple[Path, float]:
    """Write `recipe` to `path` (YAML: what ran) and `minigem train` it; return (final
    checkpoint directory, wall seconds)."""
    path = Path(path)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    _, wall = run_cli(["train", str(path)], threads, cwd)
    return Path(recipe["training"]["output_dir"]) / "final", wall


def save_results(out: str | Path, res: dict, table_md: str) -> None:
    """Write an ablation's OUT/ablation.json and OUT/ablation.md (atomically) and print the table."""
    from minigem.fileio import atomic_write

    atomic_write(Path(out) / "ablation.json", (json.dumps(res, indent=2) + "\n").encode())
    atomic_write(Path(out) / "ablation.md", table_md.encode())
    print(table_md)
