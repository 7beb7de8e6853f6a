"""``minigem chat --gen``: ask the model for an image, draw its ``<h>`` prompt, save PNGs.

One-shot: prints the answer (no markers), ``prompt: ...`` and ``image: PATH`` per saved
file, or with ``--json`` one line ``{"text", "prompt", "images": [paths]}``. When the model
writes no ``<h>...</h>`` span the answer is printed, a note says so on stderr, and the
exit status is still 0. Interactive: every turn asks for an image.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from minigem.imagegen.bridge import DiffusionBridge, parse_size
from minigem.imagegen.chat import ChatResult, answer_with_image, ask_for_image, save_images

NO_PROMPT = "no image: the model wrote no <h>...</h> image prompt in its answer"


def add_image_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image generation (--gen)")
    g.add_argument("--gen", action="store_true",
                   help="ask for an image: the question ends in <GEN>, the answer's <h>...</h> "
                        "prompt is drawn")
    g.add_argument("--image-pipeline", default=None, metavar="DIR",
                   help="diffusers text-to-image pipeline directory (default: the bundled one)")
    g.add_argument("--out-dir", default="minigem-images", help="where PNGs go (default: %(default)s)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--size", default=None, help="WIDTHxHEIGHT, e.g. 512x512 (default: the pipeline's)")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--image-seed", type=int, default=None, help="image seed (default: --seed)")


def bridge_from_args(args: argparse.Namespace) -> DiffusionBridge:
    """The pipeline checked up front, so a bad directory fails before the model loads."""
    return DiffusionBridge(args.image_pipeline, steps=args.steps, guidance=args.guidance,
                           size=parse_size(args.size) if args.size else None,
                           negative_prompt=args.negative_prompt)


def image_seed(args: argparse.Namespace) -> int | None:
    return args.image_seed if args.image_seed is not None else args.seed


def chat_gen(args: argparse.Namespace, gen: dict[str, Any]) -> int:
    """The ``chat --gen`` verb; ``gen``: the text decoding options (and ``system``)."""
    from minigem.commands import interactive, load, open_image

    bridge = bridge_from_args(args)
    model = load(args.model)
    images = [open_image(p) for p in args.image]
    options = {"seed": image_seed(args)}

    def draw(answer: str) -> tuple[ChatResult, list[str]]:
        result = answer_with_image(answer, bridge, options)
        return result, [str(p) for p in save_images(result.images, args.out_dir)]

    if args.question is None:
        def turn(answer: str) -> tuple[str, list[str]]:
            result, paths = draw(answer)
            return result.text, notes(result, paths)

        return interactive(model, images, gen, image_turn=turn)
    answer = model.chat_batch([(images, ask_for_image(args.question))], **gen)[0]
    result, paths = draw(answer)
    report(result, paths, as_json=args.json)
    return 0


def notes(result: ChatResult, paths: list[str]) -> list[str]:
    """The lines printed after the answer: the prompt and the saved files, or why none."""
    if result.prompt is None:
        return [NO_PROMPT]
    return [f"prompt: {result.prompt}", *(f"image: {p}" for p in paths)]


def report(result: ChatResult, paths: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"text": result.text, "prompt": result.prompt, "images": paths},
                         ensure_ascii=False))
    else:
        print(result.text)
        if result.prompt is not None:
            print("\n".join(notes(result, paths)))
    if result.prompt is None:
        print(NO_PROMPT, file=sys.stderr)


DEMO_REQUEST = "Draw a green triangle."


def demo_generation(model, out_dir: str = "minigem-images") -> None:
    """``make demo``'s one generation with the bundled pipeline (a notice when there is none)."""
    from minigem.imagegen.bridge import default_pipeline

    if default_pipeline() is None:
        print("\n(image generation skipped: the bundled text-to-image pipeline is not installed)")
        return
    answer = model.chat_batch([(None, ask_for_image(DEMO_REQUEST))], max_new_tokens=64)[0]
    result = answer_with_image(answer, DiffusionBridge(), {"seed": 0})
    paths = [str(p) for p in save_images(result.images, out_dir)]
    print(f"\n[image generation]\n  Q: {DEMO_REQUEST} <GEN>\n  A: {result.text}")
    for line in notes(result, paths):
        print(f"  {line}")
