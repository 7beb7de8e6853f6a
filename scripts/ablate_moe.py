#!/usr/bin/env python
"""Dense vs MoE in miniature: three stage-III branches from one dense stage-II model, same budget.

    python scripts/ablate_moe.py [--base runs/tiny-shapes/final] [--out runs/ablate-moe] \
        [--steps 900] [--batch-size 32] [--lr 2e-4] [--n-test 1000] [--threads 2]

Branches (same steps, batch, lr, schedule and data: the bundled recipe's instruct mix with a new
synth seed), each run through the CLI (`minigem train` with `training.init_from`):

- dense:      continue training the dense model, train [connector, llm];
- moe:        MoE-Tuning stage III: `upcycle: true`, 4 experts top-2 on the `sparse` layers,
              train [moe] (experts + routers only);
- dense-wide: the dense model with the FFNs of those same layers widened 2x by function-preserving
              duplication (`model.ffn_widen`, Net2Net), so its active parameters per token equal
              the top-2 MoE's; trained like `dense` ([connector, llm]).

Each result is scored with `minigem eval --json` on a fresh synthetic split; the MoE branch's
expert load comes from `minigem inspect-routing --json`. Writes OUT/recipes/*.yaml (what ran),
OUT/ablation.json and OUT/ablation.md (also printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from minigem.training.runs import (
    ablation_parser,
    mean_samples_per_s,
    require_base,
    run_cli,
    save_results,
    train_recipe,
)

ROOT = Path(__file__).resolve().parents[1]
TEST_SEED = 20261123
MOE = {"num_experts": 4, "top_k": 2, "layers": "sparse", "capacity_factor": None,
       "eval_capacity_factor": None, "aux_loss_coef": 0.01}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # ~5 min per branch on 2 cores: instruct runs at ~100 samples/s at batch 32 -> 300 * 100 / 32
    ap = ablation_parser(__doc__.splitlines()[0], base="runs/tiny-shapes/final",
                         base_help="dense stage-II native checkpoint",
                         recipe=str(ROOT / "recipes" / "tiny-shapes.yaml"),
                         recipe_help="recipe whose `instruct` stage data block is reused",
                         out="runs/ablate-moe", steps=900, lr=2e-4, data_seed=4)
    ap.add_argument("--routing-limit", type=int, default=300, help="test records for inspect-routing")
    ap.add_argument("--branches", default="dense,moe,dense-wide", help="comma-separated subset")
    return ap.parse_args(argv)


def cli(args: argparse.Namespace, *argv: str) -> tuple[str, float]:
    """Run `python -m minigem.cli ARGV` with the thread budget; return (stdout, wall seconds)."""
    return run_cli(argv, args.threads, ROOT)


def instruct_data(recipe: Path, seed: int) -> dict:
    stages = yaml.safe_load(recipe.read_text())["training"]["stages"]
    data = next(s for s in stages if s["name"] == "instruct")["data"]
    data = json.loads(json.dumps(data))
    data["synth"]["seed"] = seed
    return data


def write_widened(base: Path, dst: Path, moe: dict) -> Path:
    """The base model with the MoE layers' FFNs widened top_k x (function-preserving)."""
    import torch

    from minigem.checkpoints.native import load_model, save_model
    from minigem.config import FFNWidenConfig
    from minigem.llm.widen import widen_ffn

    model = load_model(base)
    cfg = FFNWidenConfig(factor=moe["top_k"], layers=moe["layers"])
    widen_ffn(model.language_model, cfg, generator=torch.Generator().manual_seed(0))
    model.config.ffn_widen = cfg
    return save_model(model, dst)


def branch_recipes(args: argparse.Namespace, out: Path, base: Path, wide: Path | None) -> dict[str, dict]:
    data = instruct_data(Path(args.recipe), args.data_seed)

    def recipe(name: str, init_from: Path, train: list[str], **stage_extra) -> dict:
        stage = {"name": name, "train": train, "data": data, "lr": args.lr, "schedule": "cosine",
                 "warmup_ratio": 0.02, "batch_size": args.batch_size, "steps": args.steps,
                 "padding_free": args.padding_free, **stage_extra}
        return {"training": {"output_dir": str(out / "runs" / name), "seed": 0, "bf16": "auto",
                             "log_every": max(1, min(25, args.steps)), "save_every": 10 ** 9,
                             "init_from": str(init_from), "stages": [stage]}}

    recipes = {"dense": recipe("dense", base, ["connector", "llm"]),
               "moe": {"model": {"moe": MOE}, **recipe("moe", base, ["moe"], upcycle=True)}}
    if wide is not None:
        recipes["dense-wide"] = recipe("dense-wide", wide, ["connector", "llm"])
    return recipes


def param_counts(path: Path, train: list[str]) -> dict[str, int]:
    """Total, active per token (top-k of E experts) and trained parameters of a checkpoint."""
    from minigem.checkpoints.native import load_model
    from minigem.llm.moe import moe_layers
    from minigem.training.stages import component_parameters

    model = load_model(path)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0  # a token runs top_k of each MoE layer's E experts
    top_k = model.config.moe.top_k if model.config.moe is not None else 0
    for layer in moe_layers(model).values():
        per_expert = sum(p.numel() for p in layer.experts[0].parameters())
        inactive += (len(layer.experts) - top_k) * per_expert
    trained = {id(p): p.numel() for c in train for _, p in component_parameters(model, c)}
    return {"total": total, "active": total - inactive, "trained": sum(trained.values())}


def table(res: dict) -> str:
    rows = res["branches"]
    cats = sorted({c for r in rows.values() for c in r["eval"]["per_category"]})
    head = ["branch", "trains", "total params", "active params", "trained params", "train s",
            "samples/s", "accuracy", *cats]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        p, ev = r["params"], r["eval"]
        sps = f"{r['samples_per_s']:.1f}" if r.get("samples_per_s") else "-"
        cells = [name, ", ".join(r["train"]) or "-", f"{p['total']:,}", f"{p['active']:,}",
                 f"{p['trained']:,}" if r["train"] else "-",
                 f"{r['train_s']:.0f}" if r.get("train_s") is not None else "-", sps,
                 f"{ev['accuracy']:.1%}",
                 *(f"{ev['per_category'][c]['accuracy']:.1%}" if c in ev["per_category"] else "-"
                   for c in cats)]
        lines.append("| " + " | ".join(cells) + " |")
    s = res["setup"]
    out = [f"Base `{s['base']}`; {s['steps']} steps x batch {s['batch_size']}, lr {s['lr']} cosine, "
           f"synth seed {s['data_seed']}; test: {s['n_test']} records, seed {TEST_SEED}; "
           f"{s['threads']} threads.", "", *lines]
    routing = res.get("routing")
    if routing:
        e = routing["num_experts"]
        out += ["", f"Expert load of the MoE branch (share of top-{routing['top_k']} assignments per "
                f"expert, {routing['tokens']['image']} image / {routing['tokens']['text']} text tokens; "
                f"uniform = {1 / e:.1%}):", "",
                "| layer | tokens | " + " | ".join(f"expert {j}" for j in range(e)) + " |",
                "|" + "---|" * (e + 2)]
        for layer, kinds in routing["layers"].items():
            for kind, share in kinds.items():
                cells = [f"{x:.1%}" for x in share] if share else ["-"] * e
                out.append(f"| {layer} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    base = require_base(args.base, args.recipe)
    branches = [b.strip() for b in args.branches.split(",") if b.strip()]
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    wide = write_widened(base, out / "dense-wide-init", MOE) if "dense-wide" in branches else None
    recipes = branch_recipes(args, out, base, wide)
    test = out / "test" / "data.json"
    if not test.is_file():
        cli(args, "data", "synth", "--out", str(out / "test"), "--n", str(args.n_test), "--seed", str(TEST_SEED))
    res: dict = {"setup": {"base": str(base), "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                           "data_seed": args.data_seed, "n_test": args.n_test, "threads": args.threads,
                           "padding_free": args.padding_free, "moe": MOE}, "branches": {}}
    ev, _ = cli(args, "eval", "--model", str(base), "--data", str(test), "--json")
    res["branches"]["base (stage II)"] = {"train": [], "eval": json.loads(ev),
                                         "params": param_counts(base, [])}
    for name in branches:
        recipe = recipes[name]
        final, wall = train_recipe(recipe, out / "recipes" / f"{name}.yaml", args.threads, ROOT)
        ev, _ = cli(args, "eval", "--model", str(final), "--data", str(test), "--json")
        train = recipe["training"]["stages"][0]["train"]
        res["branches"][name] = {"train": train, "train_s": wall, "eval": json.loads(ev),
                                 "samples_per_s": mean_samples_per_s(final.parent),
                                 "params": param_counts(final, train), "checkpoint": str(final)}
        if name == "moe":
            rt, _ = cli(args, "inspect-routing", "--model", str(final), "--data", str(test), "--limit",
                        str(args.routing_limit), "--out", str(out / "routing.png"), "--json")
            res["routing"] = json.loads(rt)
    save_results(out, res, table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
