#!/usr/bin/env python
"""Mini-Gemini's ablation in miniature (the paper's Table 2): LR-only vs + HR patch mining.

    python scripts/ablate_mgm.py [--base minigem/assets/tiny-shapes] [--out runs/ablate-mgm] \
        [--steps 1500] [--hr-steps 600] [--arms lr,mgm] [--n-test 1000] [--threads 2]

Every arm starts from the same LLaVA checkpoint (`--base`: its LR CLIP tower, connector and LLM)
and gets the same budget: the same steps, batch, lr, schedule and data (the base recipe's
instruct mix with more glyph questions, rendered at the HR size), run through the CLI
(`minigem train` with `training.init_from`). So the LR tower, the LLM and the visual token
count are the same in every arm; only the connector's input differs.

- lr:      continue training the base (LR only), train [connector, llm];
- mgm:     the base plus a high-res ConvNeXt and patch mining (`connector.type: patch_mining`,
           same pool / pool_mode / pos_embed and the base's projector weights; the value
           projection starts at zero, so before training the model is the base exactly).
           The HR tower is pretrained first, CLIP-style, on images paired with the glyph they
           show (a `contrastive` stage, train [vision_aux]), then frozen; the arm trains
           [connector, llm] (mining + projector + LLM), as MGM's stage 2 does;
           `--mgm-init DIR` starts the mgm arms from a Mini-Gemini checkpoint of the same base
           instead (e.g. tower + mining pretrained on glyph targets by `probe_mining.py
           --train-hr --variants mining --save DIR`);
- mgm-hd:  as mgm with HD token extension (image_grid 2 + a global view: 5x the tokens, HR
           side doubled), from the same pretrained HR tower.

Writes OUT/recipes/*.yaml (what ran), OUT/ablation.json and OUT/ablation.md (also printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from minigem.checkpoints.native import load_model, save_model
from minigem.training.runs import (
    ablation_parser,
    mean_samples_per_s,
    require_base,
    run_cli,
    save_results,
    train_recipe,
)

ROOT = Path(__file__).resolve().parents[1]
TEST_SEED = 20261124
# the tiny HR tower: a 4-stage ConvNeXt, 96 px -> a 24x24 map (M = 8 per token of a 3x3 grid)
HR_TOWER = {"timm_name": "convnext_tiny", "config": {"dims": [32, 48, 64, 96], "depths": [1, 1, 1, 1]}}
HR_SIZE = 96


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = ablation_parser(__doc__.splitlines()[0], base=str(ROOT / "minigem" / "assets" / "tiny-shapes"),
                         base_help="the LLaVA native checkpoint every arm starts from",
                         recipe=str(ROOT / "recipes" / "tiny-shapes.yaml"),
                         recipe_help="recipe whose `instruct` stage mix is reused (glyph weight raised)",
                         out="runs/ablate-mgm", steps=1500, lr=5e-4, data_seed=5)
    ap.add_argument("--glyph-weight", type=float, default=0.3, help="glyph share of the training mix")
    ap.add_argument("--hr-size", type=int, default=HR_SIZE)
    ap.add_argument("--hr-steps", type=int, default=0,
                    help="HR tower contrastive pretraining steps before the arms (0: none)")
    ap.add_argument("--freeze-hr", action="store_true",
                    help="keep the HR tower frozen in the mgm arms (MGM's own recipe; use with --hr-steps)")
    ap.add_argument("--hr-lr", type=float, default=2e-3)
    ap.add_argument("--hr-pool", choices=["max", "mean"], default="max",
                    help="how the HR map is pooled for the contrastive loss")
    ap.add_argument("--hr-only", action="store_true",
                    help="stop after the HR pretraining (OUT/runs/hr-pretrain/final; see scripts/probe_mining.py)")
    ap.add_argument("--mgm-init", metavar="DIR",
                    help="start the mgm arms from this Mini-Gemini checkpoint (HR tower and mining as it "
                         "has them, e.g. `probe_mining.py --train-hr --save DIR`) instead of a fresh HR "
                         "tower; the rest of the model must be --base's")
    ap.add_argument("--glyph-init", action="store_true",
                    help="build the mgm arms' init here (docs/mini-gemini.md): after the HR pretraining "
                         "(--hr-steps, --freeze-hr), probe_mining.py trains tower + mining on per-object "
                         "glyph targets, then mining + projector (--keep-on mined); not counted in the "
                         "arms' budget")
    ap.add_argument("--init-steps", type=int, nargs=2, default=[3000, 1500], metavar=("MINING", "PROJECTOR"),
                    help="--glyph-init: probe_mining.py steps of its two stages")
    ap.add_argument("--init-scenes", type=int, nargs=2, default=[3000, 500], metavar=("TRAIN", "TEST"),
                    help="--glyph-init: probe_mining.py's training and held-out scenes")
    ap.add_argument("--num-workers", type=int, default=0, help="data loader processes (training)")
    ap.add_argument("--arms", default="lr,mgm", help="comma-separated subset of lr,mgm,mgm-hd")
    return ap.parse_args(argv)


def cli(args: argparse.Namespace, *argv: str) -> tuple[str, float]:
    """Run `python -m minigem.cli ARGV` with the thread budget; return (stdout, wall seconds)."""
    return run_cli(argv, args.threads, ROOT)


def train_data(args: argparse.Namespace) -> dict:
    stages = yaml.safe_load(Path(args.recipe).read_text())["training"]["stages"]
    synth = dict(next(s for s in stages if s["name"] == "instruct")["data"]["synth"])
    mix = {k: v for k, v in (synth.get("mix") or {}).items() if k != "glyph"}
    total = sum(mix.values()) or 1.0
    mix = {k: v * (1 - args.glyph_weight) / total for k, v in mix.items()}
    mix["glyph"] = args.glyph_weight
    return {"synth": {**synth, "seed": args.data_seed, "image_size": args.hr_size, "mix": mix}}


def write_mgm_init(base: Path, dst: Path, hr_size: int, hd: bool) -> Path:
    """The base LLaVA plus a fresh HR tower and mining layers, as a native checkpoint.

    Every base weight is copied (LR tower, projector, pos_embed, LLM); the value projection
    of the mining layer is zero, so on the same LR pixels the new model computes exactly what
    the base does until training moves it."""
    import torch

    from minigem.config import VisionAuxConfig
    from minigem.model import VisionLanguageModel

    src = load_model(base)
    cfg = src.config.model_copy(deep=True)
    if cfg.vision_aux is not None or cfg.connector.type == "patch_mining":
        raise SystemExit(f"{base}: already a Mini-Gemini model; --base must be LR-only")
    cfg.vision_aux = VisionAuxConfig(**HR_TOWER, image_size=2 * hr_size if hd else hr_size,
                                     image_grid=2 if hd else 1, image_global=hd)
    # an LR-only connector type is its projector kind (linear or mlp2x_gelu)
    cfg.connector = cfg.connector.model_copy(update={"type": "patch_mining",
                                                     "projector": cfg.connector.type})
    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg, src.tokenizer)
    state = src.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    new = [k for k in missing if not k.startswith(("vision_tower_aux.", "connector.vlm_uni_"))]
    if new or unexpected:
        raise SystemExit(f"base weights do not map onto the MGM model: missing {new}, unexpected {unexpected}")
    val = model.connector.vlm_uni_val_projector[1]
    with torch.no_grad():
        val.weight.zero_()
        val.bias.zero_()
    return save_model(model, dst)


def check_mgm_init(base: Path, init: Path) -> None:
    """--mgm-init must be a Mini-Gemini checkpoint built on --base: the same LR tower and LLM
    (weights may have moved only where the mining, projector or HR tower are)."""
    import torch

    if not (init / "config.json").is_file():
        raise SystemExit(f"--mgm-init {init}: not a model directory")
    model = load_model(init)
    if model.vision_tower_aux is None or model.config.connector.type != "patch_mining":
        raise SystemExit(f"--mgm-init {init}: not a Mini-Gemini (patch mining) checkpoint")
    mine, theirs = model.state_dict(), load_model(base).state_dict()
    moved = sorted(k for k, v in theirs.items()
                   if k.startswith(("vision_tower.", "language_model."))
                   and (k not in mine or not torch.equal(v, mine[k])))
    if moved:
        raise SystemExit(f"--mgm-init {init}: its LR tower / LLM differ from --base {base} "
                         f"({len(moved)} tensors, e.g. {moved[0]})")


def glyph_init(args: argparse.Namespace, out: Path, hr_final: Path) -> tuple[Path, float]:
    """The mgm arms' init from the pretrained HR tower, by scripts/probe_mining.py: tower + mining
    on per-object glyph targets, then mining + projector with what the LLM sees kept near the
    base's (`--keep-on mined`). Returns (the second stage's checkpoint, wall seconds of both)."""
    mined, proj = out / "init" / "glyph-mined", out / "init" / "glyph-proj"
    (mining_steps, proj_steps), (train, test) = args.init_steps, args.init_scenes
    common = ["--train-scenes", str(train), "--test-scenes", str(test), "--threads", str(args.threads)]
    script, total = ROOT / "scripts" / "probe_mining.py", 0.0
    for argv in (["--model", str(hr_final), "--variants", "mining", "--train-hr", "--steps", str(mining_steps),
                  "--report", str(max(1, mining_steps // 6)), "--save", str(mined)],
                 ["--model", str(mined), "--variants", "projector", "--keep-on", "mined",
                  "--keep-scenes", str(min(1000, train)), "--steps", str(proj_steps),
                  "--report", str(max(1, proj_steps // 6)), "--save", str(proj)]):
        report, wall = run_cli([*argv, *common], args.threads, ROOT, script=script)
        print(report, end="", flush=True)
        total += wall
    return proj, total


def base_recipe(args: argparse.Namespace, out: Path, name: str, init_from: Path, stage: dict) -> dict:
    return {"training": {"output_dir": str(out / "runs" / name), "seed": 0, "bf16": "auto",
                         "num_workers": args.num_workers,
                         "log_every": 25, "save_every": 10 ** 9, "init_from": str(init_from),
                         "stages": [stage]}}


def hr_pretrain_recipe(args: argparse.Namespace, out: Path, init: Path, name: str) -> dict:
    """CLIP-style pretraining of the HR tower alone: each image with a caption naming every
    glyph it shows (the synth `glyphs` task: "3, a"), image features max-pooled."""
    stage = {"name": "hr-contrastive", "kind": "contrastive", "train": ["vision_aux"],
             "data": {"synth": {"n": 1_000_000, "seed": 11, "image_size": args.hr_size, "tasks": ["glyphs"]}},
             "lr": args.hr_lr, "weight_decay": 0.05, "warmup_ratio": 0.05, "batch_size": 64,
             "steps": args.hr_steps,
             "contrastive": {"embed_dim": 128, "text_width": 128, "text_layers": 1, "text_heads": 4,
                             "pool": args.hr_pool}}
    return base_recipe(args, out, name, init, stage)


def arm_recipe(args: argparse.Namespace, out: Path, name: str, init: Path) -> dict:
    train = ["connector", "llm"]
    if name.startswith("mgm") and not args.freeze_hr:
        train.append("vision_aux")
    stage = {"name": name, "train": train, "data": train_data(args), "lr": args.lr,
             "adam_beta2": 0.95, "schedule": "cosine", "warmup_ratio": 0.03,
             "batch_size": args.batch_size, "steps": args.steps, "padding_free": args.padding_free}
    return base_recipe(args, out, name, init, stage)


def table(res: dict) -> str:
    rows = res["arms"]
    cats = sorted({c for r in rows.values() for c in r["eval"]["per_category"]})
    head = ["arm", "visual tokens", "train s", "samples/s", "accuracy", *cats]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        ev = r["eval"]
        cells = [name, str(r["tokens"]), f"{r['train_s']:.0f}" if r.get("train_s") else "-",
                 f"{r['samples_per_s']:.1f}" if r.get("samples_per_s") else "-", f"{ev['accuracy']:.1%}",
                 *(f"{ev['per_category'][c]['accuracy']:.1%}" if c in ev["per_category"] else "-"
                   for c in cats)]
        lines.append("| " + " | ".join(cells) + " |")
    s = res["setup"]
    if s.get("glyph_init"):
        g = s["glyph_init"]
        hr = (f"HR tower pretrained {s['hr_steps']} steps, then tower + mining ({g['steps'][0]} steps) and mining "
              f"+ projector ({g['steps'][1]} steps) on per-object glyph targets ({s['hr_pretrain_s'] + g['s']:.0f} s "
              "in all, not counted in the arms' budget)")
    elif s.get("mgm_init"):
        hr = f"mgm arms from `{s['mgm_init']}` (its HR tower, mining and projector as they are; their pretraining is not counted in the arms' budget)"
    elif s["hr_steps"]:
        hr = f"HR tower pretrained {s['hr_steps']} steps ({s['hr_pretrain_s']:.0f} s, not counted in the arms' budget)"
    else:
        hr = "HR tower from random init"
    hr += ", trained in the mgm arms" if s["hr_trained_in_arms"] else ", frozen in the mgm arms"
    head_line = (f"Base `{s['base']}`; every arm {s['steps']} steps x batch {s['batch_size']}, lr {s['lr']} "
                 f"cosine, synth seed {s['data_seed']} at {s['hr_size']} px, glyph share {s['glyph_weight']}; "
                 f"{hr}; test: {s['n_test']} records, seed {TEST_SEED}; {s['threads']} threads"
                 f"{'; padding-free' if s.get('padding_free') else ''}.")
    return "\n".join([head_line, "", *lines]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    base = require_base(args.base, args.recipe)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ("lr", "mgm", "mgm-hd")]
    if bad:
        raise SystemExit(f"unknown arm(s) {bad}; valid: lr, mgm, mgm-hd")
    if args.hr_only and args.hr_steps <= 0:
        raise SystemExit("--hr-only needs --hr-steps N (N > 0)")
    if args.glyph_init and (args.mgm_init or args.hr_only or args.hr_steps <= 0 or not args.freeze_hr):
        raise SystemExit("--glyph-init builds the mgm init from a pretrained, frozen HR tower: give "
                         "--hr-steps N --freeze-hr, without --mgm-init / --hr-only")
    mgm_init = None
    if args.mgm_init:
        if args.hr_steps > 0 or args.hr_only:
            raise SystemExit("--mgm-init brings its own HR tower: drop --hr-steps / --hr-only")
        mgm_init = Path(args.mgm_init).resolve()
        check_mgm_init(base, mgm_init)
    (out / "recipes").mkdir(parents=True, exist_ok=True)

    def run(name: str, recipe: dict) -> tuple[Path, float]:
        return train_recipe(recipe, out / "recipes" / f"{name}.yaml", args.threads, ROOT)

    res: dict = {"setup": {"base": str(base), "steps": args.steps, "batch_size": args.batch_size,
                           "lr": args.lr, "data_seed": args.data_seed, "glyph_weight": args.glyph_weight,
                           "hr_size": args.hr_size, "hr_steps": args.hr_steps, "n_test": args.n_test,
                           "threads": args.threads, "padding_free": args.padding_free,
                           "hr_tower": HR_TOWER, "hr_pretrain_s": 0.0,
                           "hr_trained_in_arms": not args.freeze_hr,
                           "mgm_init": str(mgm_init) if mgm_init else None},
                 "arms": {}}
    inits: dict[str, Path] = {}
    if args.hr_only or any(a.startswith("mgm") for a in arms):
        hr_final = mgm_init or write_mgm_init(base, out / "init" / "mgm-fresh", args.hr_size, hd=False)
        if args.hr_steps > 0:  # pretrain the HR tower once (the contrastive stage trains only it)
            hr_final, wall = run("hr-pretrain", hr_pretrain_recipe(args, out, hr_final, "hr-pretrain"))
            res["setup"]["hr_pretrain_s"] = wall
        if args.glyph_init:
            hr_final, wall = glyph_init(args, out, hr_final)
            res["setup"]["glyph_init"] = {"steps": args.init_steps, "scenes": args.init_scenes, "s": wall}
        inits["mgm"] = hr_final
        if args.hr_only:
            print(f"HR tower pretrained: {hr_final}")
            return 0
        if "mgm-hd" in arms:  # the same pretrained tower and mining init, HD processing
            hd = write_mgm_init(base, out / "init" / "mgm-hd-fresh", args.hr_size, hd=True)
            model = load_model(hd)
            pretrained = load_model(hr_final).state_dict()
            model.load_state_dict({k: v for k, v in pretrained.items()
                                   if k.startswith(("vision_tower_aux.", "connector."))}, strict=False)
            inits["mgm-hd"] = save_model(model, out / "init" / "mgm-hd")
    test = out / "test" / "data.json"
    if not test.is_file():
        cli(args, "data", "synth", "--out", str(out / "test"), "--n", str(args.n_test),
            "--seed", str(TEST_SEED), "--image-size", str(args.hr_size))
    for name in arms:
        final, wall = run(name, arm_recipe(args, out, name, base if name == "lr" else inits[name]))
        ev, _ = cli(args, "eval", "--model", str(final), "--data", str(test), "--json", "--dtype", "fp32",
                    "--predictions", str(out / f"{name}.predictions.jsonl"))
        res["arms"][name] = {"train_s": wall, "eval": json.loads(ev), "checkpoint": str(final),
                             "samples_per_s": mean_samples_per_s(final.parent),
                             "tokens": load_model(final).tokens_per_image}
        save_results(out, res, table(res))  # after every arm: a cut-off run keeps what finished
    return 0


if __name__ == "__main__":
    sys.exit(main())
