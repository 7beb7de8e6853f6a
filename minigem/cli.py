"""The `minigem` command: one entry point, one verb per job.

User mistakes (bad config, missing files, bad data) print one clear `error:` line and exit
with status 2; no stack traces.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from minigem.errors import MinigemError
from minigem.imagegen.command import add_image_args


def _add_gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def _gen_kwargs(a: argparse.Namespace) -> dict:
    return {"temperature": a.temperature, "top_p": a.top_p, "max_new_tokens": a.max_new_tokens,
            "stop": tuple(a.stop), "seed": a.seed}


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and compute dtype (auto: bf16 on a GPU that supports it, else fp32)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="minigem", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="run the bundled model on the example images")
    p.add_argument("--examples", default=None, help="folder with questions.json and images")

    p = sub.add_parser("chat", help="ask about images (interactive when no question is given)")
    p.add_argument("question", nargs="?")
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--json", action="store_true", help='print {"text": ...}')
    p.add_argument("--system", default=None, help="system prompt")
    _add_gen_args(p)
    add_image_args(p)
    _add_device_args(p)

    p = sub.add_parser("train", help="train a model from a recipe")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.seed=1")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N optimiser steps (checkpointed)")

    p = sub.add_parser("eval", help="accuracy per category on LLaVA-format data")
    p.add_argument("--model", default=None)
    p.add_argument("--data", required=True)
    p.add_argument("--image-folder", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--json", action="store_true")
    p.add_argument("--predictions", default=None, metavar="FILE",
                   help="also write every record's prediction, reference and score as JSONL")
    p.add_argument("--no-hr", action="store_true",
                   help="score a Mini-Gemini as its LR-only LLaVA (HR tower not run, nothing mined)")
    _add_device_args(p)

    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("synth", help="write a synthetic-world dataset (LLaVA JSON + images)")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=128)
    s.add_argument("--tasks", default=None, help="comma-separated categories (default: all)")

    p = sub.add_parser("convert", help="import a foreign checkpoint into the native format")
    p.add_argument("--from", dest="fmt", required=True, choices=["hf-llava", "moe-llava", "mgm"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--vision-tower", default=None, help="HF CLIP vision model directory (moe-llava, mgm)")
    p.add_argument("--vision-tower-aux", default=None,
                   help="timm/open_clip ConvNeXt checkpoint file or directory (mgm HR tower)")
    p.add_argument("--template", default=None, help="chat template name (default: the checkpoint's)")

    p = sub.add_parser("explain", help="draw where a Mini-Gemini model's LR tokens looked in the HR image")
    p.add_argument("question")
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--out", required=True, help="PNG file for the heat map")
    p.add_argument("--json", action="store_true", help="print answer, out path and top tokens as JSON")
    p.add_argument("--top-k", type=int, default=5, help="relied-on LR tokens to outline (default 5)")
    p.add_argument("--system", default=None, help="system prompt")
    _add_gen_args(p)
    _add_device_args(p)

    p = sub.add_parser("inspect-routing", help="plot how MoE layers route image vs text tokens")
    p.add_argument("--model", required=True, help="a native MoE model directory")
    p.add_argument("--data", required=True, help="LLaVA JSON/JSONL records (teacher-forced)")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--limit", type=int, default=None, help="first N records")
    p.add_argument("--out", required=True, help="PNG file for the bar-chart grid")
    p.add_argument("--json", action="store_true", help="print the shares as JSON")

    p = sub.add_parser("serve", help="OpenAI-compatible API and web UI (127.0.0.1 by default)")
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this key (default: $MINIGEM_API_KEY)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: cores - 1)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (public addresses only)")
    p.add_argument("--image-pipeline", default=None, metavar="DIR",
                   help="diffusers text-to-image pipeline for image generation "
                        "(default: the bundled one if installed)")
    p.add_argument("--no-image-generation", action="store_true", help="serve without image generation")
    _add_device_args(p)

    p = sub.add_parser("export", help="export a native checkpoint to a foreign format")
    p.add_argument("--to", dest="fmt", required=True, choices=["hf-llava"])
    p.add_argument("src")
    p.add_argument("dst")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from minigem import commands

    handler = getattr(commands, f"cmd_{args.cmd.replace('-', '_')}")
    try:
        return handler(args) or 0
    except MinigemError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def print_json(obj: object) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def resolve(path: str | None) -> Path | None:
    return Path(path).expanduser() if path else None


if __name__ == "__main__":
    sys.exit(main())
