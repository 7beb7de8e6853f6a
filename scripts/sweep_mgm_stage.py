"""Variants of tiny-mgm's last (`mgm`) stage, trained in parallel from the stage-5 boundary
checkpoint and scored on fresh splits (docs/mini-gemini.md, "Twenty-second session").

    python scripts/sweep_mgm_stage.py OUT --variants base-s5,lr1e3-s5 [--boundary runs/tmgm6-b5]

Each variant is recipes/tiny-mgm.yaml with its `mgm` stage changed as in VARIANTS, run as
`minigem train RECIPE --resume` from a copy of the boundary checkpoint (bf16 off, one thread per
process), then `minigem eval` on three splits generated here (3000 records of scene questions,
2000 generation requests, 400 `object` questions; seeds 20261301-3, not used to choose
anything before). On one GPU the processes share the device (for the docs: 8 variants at once
on an H100, ~6.5 min of training each); on this CPU run one variant at a time. Runs, splits and
logs go to OUT/work; OUT/results.json holds the per-category scores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / "recipes" / "tiny-mgm.yaml").read_text())
MIX = BASE["training"]["stages"][-1]["data"]["synth"]["mix"]
POS = {**MIX, "color": 0.05, "shape": 0.05, "existence": 0.06, "position": 0.10,
       "gen_context": 0.20}
VARIANTS = {  # name -> changes to the mgm stage (keys under `synth` go to its data)
    "base-s5": {},
    "base-s15": {"synth": {"seed": 15}},
    "lr1e3-s5": {"lr": 1e-3},
    "lr1e3-s15": {"lr": 1e-3, "synth": {"seed": 15}},
    "pos-s5": {"synth": {"mix": POS}},
    "pos-s15": {"synth": {"seed": 15, "mix": POS}},
    "lr1e3pos-s5": {"lr": 1e-3, "synth": {"mix": POS}},
    "lr1e3pos-s15": {"lr": 1e-3, "synth": {"seed": 15, "mix": POS}},
}
SPLITS = {  # name -> `minigem data synth` arguments
    "sc": ["--n", "3000", "--seed", "20261301", "--image-size", "96"],
    "gen": ["--n", "2000", "--seed", "20261302", "--image-size", "96", "--tasks", "generation"],
    "obj": ["--n", "400", "--seed", "20261303", "--image-size", "96", "--tasks", "object"],
}
CLI = [sys.executable, "-m", "minigem.cli"]


def prepare(name: str, boundary: Path, root: Path) -> Path:
    """Write the variant's recipe and a run folder that resumes at the boundary."""
    recipe = copy.deepcopy(BASE)
    stage = recipe["training"]["stages"][-1]
    change = copy.deepcopy(VARIANTS[name])
    stage["data"]["synth"].update(change.pop("synth", {}))
    stage.update(change)
    recipe["training"].update(output_dir=str(root / name), bf16="off", save_every=100000)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    ckpts = root / name / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    shutil.copytree(boundary, ckpts / "stage5-step0000000", dirs_exist_ok=True)
    (ckpts / "latest").write_text("stage5-step0000000\n")
    return path


def scores(results: dict) -> dict:
    row = {c: round(100 * v["accuracy"], 1)
           for c, v in results.get("sc", {}).get("per_category", {}).items()}
    row["gen_span"] = round(100 * results.get("gen", {}).get("gen_span", {}).get("rate", float("nan")), 1)
    row["object"] = round(100 * results.get("obj", {}).get("accuracy", float("nan")), 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--variants", required=True, help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--boundary", default="runs/tmgm6-b5",
                    help="the checkpoint at the start of the mgm stage (stage 5, step 0)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    t0 = time.time()
    out = Path(a.out).resolve()
    root = out / "work"
    root.mkdir(parents=True, exist_ok=True)
    names = a.variants.split(",")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train = {n: subprocess.Popen(CLI + ["train", str(prepare(n, Path(a.boundary), root)), "--resume"],
                                 stdout=open(root / f"{n}.log", "w"), stderr=subprocess.STDOUT, env=env)
             for n in names}
    for s, args in SPLITS.items():
        if not (root / s / "data.json").exists():
            subprocess.run(CLI + ["data", "synth", "--out", str(root / s)] + args, check=True,
                           stdout=subprocess.DEVNULL)
    trained = {}
    for n, p in train.items():
        trained[n] = p.wait() == 0
        print(f"trained {n}: rc {p.returncode}, {time.time() - t0:.0f} s", flush=True)
    evals = {
        (n, s): subprocess.Popen(
            CLI + ["eval", "--model", str(root / n / "final"), "--data", str(root / s / "data.json"),
                   "--image-folder", str(root / s), "--json", "--dtype", "fp32", "--device", a.device,
                   "--batch-size", "64", "--predictions", str(out / f"pred-{n}-{s}.jsonl")],
            stdout=open(root / f"ev-{n}-{s}.json", "w"), stderr=open(root / f"ev-{n}-{s}.err", "w"),
            env=env)
        for n in names if trained[n] for s in SPLITS
    }
    raw: dict = {}
    for (n, s), p in evals.items():
        p.wait()
        raw.setdefault(n, {})[s] = json.loads((root / f"ev-{n}-{s}.json").read_text() or "{}")
    summary = {n: scores(r) for n, r in raw.items()}
    for n, row in summary.items():
        print(n, row, flush=True)
    (out / "results.json").write_text(json.dumps({"summary": summary, "raw": raw}, indent=1))
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
