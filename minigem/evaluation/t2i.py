"""Quality of a text-to-image pipeline on the synthetic world (scripts/eval_t2i.py).

Draws one image for each of `n` held-out prompts naming a colour and a shape (fixed seed),
then scores two rates: `color_match`, the drawn image's dominant non-background colour
(nearest of the world's COLORS) is the prompt's; `shape_match`, a VLM (default: the bundled
minigem model) answers the world's shape question "What shape is the {colour} object?" on the
drawing with the prompt's shape.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image

from minigem.data.synth import COLORS, POSITIONS, SHAPES, gen_prompt

HELD_OUT_SEED = "minigem-t2i/held-out"


def held_out_prompts(n: int = 50) -> list[tuple[str, str, str]]:
    """(prompt, colour, shape): single objects, sometimes with a size or a position, drawn
    with their own seed (training prompts come from per-index seeds of the recipe's data)."""
    rng = random.Random(HELD_OUT_SEED)
    out = []
    for _ in range(n):
        c, s = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
        size = rng.choice((None, None, "small", "large"))
        pos = rng.choice(POSITIONS) if rng.random() < 0.3 else None
        out.append((gen_prompt(c, s, 1, size, pos), c, s))
    return out


def evaluate_t2i(pipeline, vlm=None, n: int = 50, steps: int = 25, guidance_scale: float | None = None,
                 seed: int = 0, batch_size: int = 10, vlm_size: int = 128,
                 save_dir: str | Path | None = None) -> dict:
    """{"color_match", "shape_match", "n", "items": [...]} for `pipeline` (a TinyT2IPipeline or
    a directory). `vlm`: a minigem model, a directory, or None for the bundled one."""
    import minigem
    from minigem.imagegen.t2i import TinyT2IPipeline, dominant_color

    if isinstance(pipeline, str | Path):
        pipeline = TinyT2IPipeline.from_pretrained(str(pipeline))
    if vlm is None or isinstance(vlm, str | Path):
        vlm = minigem.load(vlm)
    if guidance_scale is None:
        guidance_scale = pipeline.config.default_guidance_scale
    items = held_out_prompts(n)
    g = torch.Generator().manual_seed(seed)
    images: list[Image.Image] = []
    for lo in range(0, n, batch_size):
        batch = [p for p, _, _ in items[lo: lo + batch_size]]
        images += pipeline(prompt=batch, num_inference_steps=steps, guidance_scale=guidance_scale,
                           generator=g).images
    rows = []
    for k, (img, (prompt, color, shape)) in enumerate(zip(images, items, strict=True)):
        big = img.resize((vlm_size, vlm_size), Image.BICUBIC)
        answer = vlm.chat(big, f"What shape is the {color} object?", max_new_tokens=4)
        drawn = dominant_color(img)
        rows.append({"prompt": prompt, "color": color, "shape": shape, "drawn_color": drawn,
                     "vlm_shape": answer.strip().lower(), "color_ok": drawn == color,
                     "shape_ok": answer.strip().lower().rstrip(".") == shape})
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            img.save(Path(save_dir) / f"{k:02d}-{prompt.replace(' ', '_')}.png")
    return {"color_match": sum(r["color_ok"] for r in rows) / n,
            "shape_match": sum(r["shape_ok"] for r in rows) / n, "n": n, "steps": steps,
            "guidance_scale": guidance_scale, "seed": seed, "items": rows}
