"""Helpers for scripts that drive training runs through the CLI (ablations, sweeps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def run_cli(argv: list[str] | tuple[str, ...], threads: int, cwd: str | Path | None = None) -> tuple[str, float]:
    """Run `python -m minigem.cli ARGV` with `threads` intra-op threads; return (stdout, wall s).

    Progress bars go to stderr as usual; a failing command raises SystemExit naming it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "minigem.cli", *argv]
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
