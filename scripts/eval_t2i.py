#!/usr/bin/env python
"""Quality of a text-to-image pipeline on 50 held-out synthetic-world prompts; prints JSON.

    python scripts/eval_t2i.py runs/tiny-shapes-t2i/final [--vlm DIR] [--n 50] [--steps 25]

color_match: the drawing's dominant colour is the prompt's; shape_match: the VLM (default:
the bundled minigem model) names the prompt's shape. See minigem/evaluation/t2i.py.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline", help="a TinyT2IPipeline directory (e.g. runs/tiny-shapes-t2i/final)")
    p.add_argument("--vlm", default=None, help="minigem model directory (default: the bundled one)")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default: the pipeline's saved default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-images", default=None, help="write the drawings to this folder")
    p.add_argument("--items", action="store_true", help="include every prompt's result")
    args = p.parse_args(argv)
    from minigem.evaluation.t2i import evaluate_t2i

    torch.manual_seed(args.seed)
    report = evaluate_t2i(args.pipeline, args.vlm, n=args.n, steps=args.steps,
                          guidance_scale=args.guidance_scale, seed=args.seed, save_dir=args.save_images)
    if not args.items:
        report.pop("items")
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
