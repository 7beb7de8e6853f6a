"""Where a model's LLM looks when it answers "Where is the red circle?": per layer and head.

`scripts/lookup_report.py` shows that wrong position and glyph answers are another object's
answer. This script shows the attention behind them, on a synthetic split and a checkpoint:

- **gather**: at the answer position (the prompt's last token, where the first answer token is
  predicted), the attention each head pays to the question's colour word and to its shape word.
  A lookup whose query never took in the colour word cannot tell the red circle from a blue one.
- **lookup**: the attention each head pays to the visual tokens over the named object's cell,
  against the mean over the other objects that share its shape (or its colour), by the buckets
  of lookup_report (for glyph questions, only other objects with a glyph count).

    python scripts/lookup_attention.py --model M --data D/data.json [--category position|glyph]
        [--limit N] [--tasks T,..] [--json]

Visual tokens are mapped to the world's 3 x 3 cells by their place in the square token grid (one
token per cell for the tiny models, 64 for a 24 x 24 grid). HD models (several views per image)
are not supported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lookup_report import NAMED, _bucket, _record_scene  # noqa: E402


def token_cells(n_tokens: int) -> list[int]:
    """The world cell (0-8, row-major) of each visual token of a row-major g x g token grid."""
    g = math.isqrt(n_tokens)
    if g * g != n_tokens:
        raise SystemExit(f"{n_tokens} visual tokens per image: not a square grid")
    return [3 * ((6 * i + 3) // (2 * g)) + (6 * j + 3) // (2 * g)  # the cell of the token's centre
            for i in range(g) for j in range(g)]


def word_positions(pieces: list[str], phrase: str, words: tuple[str, ...]) -> list[list[int]]:
    """Token indices of each of `words` in the last occurrence of `phrase` in the concatenated
    token `pieces` (each word must occur once in `phrase`)."""
    text = "".join(pieces)
    at = text.rfind(phrase)
    if at < 0:
        raise SystemExit(f"{phrase!r} not found in the prompt's decoded tokens {text[-80:]!r}")
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p)
    out = []
    for w in words:
        lo = at + phrase.index(w)
        hi = lo + len(w)
        out.append([k for k, (s, p) in enumerate(zip(starts, pieces, strict=True))
                    if s < hi and s + len(p) > lo and p.strip()])
    return out


def analyse(model, data: Path, image_folder: Path, category: str = "position",
            limit: int | None = None, tasks: list[str] | None = None) -> dict:
    """{"n", "gather": {"colour", "shape"}: [L][H], "lookup": {bucket: {"n", "target",
    "same_shape", "same_colour"}: [L][H]}} of mean attention at the answer position.

    `model` (on the CPU) is switched to eager attention, the one that returns its weights."""
    lm = model.language_model
    lm.set_attn_implementation("eager")
    if model.processor.views_per_image != 1:
        raise SystemExit("HD models (several views per image) are not supported")
    cells = token_cells(model.tokens_per_image)
    records = json.loads(data.read_text())
    gather: dict[str, torch.Tensor] = {}
    lookup: dict[str, dict] = defaultdict(lambda: {"n": 0})
    n = 0
    for rec in records:
        question = rec["conversations"][0]["value"]
        m = NAMED.match(question.removeprefix("<image>\n"))
        if rec.get("category") != category or not m:
            continue
        scene = _record_scene(rec["id"], question, tasks)
        (target,) = [o for o in scene.objects if (o.color, o.shape) == (m[1], m[2])]
        others = [o for o in scene.objects if o is not target
                  and (category == "position" or o.glyph is not None)]
        ids = model.encode_prompt(model.user_messages(m[0], 1), 1)
        pix = model.processor([Image.open(image_folder / rec["image"]).convert("RGB")])
        t = torch.tensor([ids])
        with torch.inference_mode():
            emb = model.embed(t, pix["pixel_values"], pix["pixel_values_aux"])
            att = lm(inputs_embeds=emb, output_attentions=True).attentions
        last = torch.stack([a[0, :, -1].float() for a in att])  # [L, H, S]
        pieces = [model.tokenizer.decode([i]) for i in ids]
        col, shp = word_positions(pieces, f"{m[1]} {m[2]}?", (m[1], m[2]))
        for key, where in (("colour", col), ("shape", shp)):
            gather[key] = gather.get(key, 0) + last[..., where].sum(-1)
        vis = (t[0] == model.image_token_id).nonzero().squeeze(-1)
        on_vis = last[..., vis]  # [L, H, T] over the visual tokens
        per_cell = torch.zeros(*on_vis.shape[:2], 9)
        per_cell.index_add_(2, torch.tensor(cells), on_vis)
        bucket = _bucket(others, target)
        row = lookup[bucket]
        row["target"] = row.get("target", 0) + per_cell[..., target.cell]
        for key, share in (("same_shape", "shape"), ("same_colour", "color")):
            alike = [o.cell for o in others if getattr(o, share) == getattr(target, share)]
            if alike:
                row[key] = row.get(key, 0) + per_cell[..., alike].mean(-1)
                row[f"n_{key}"] = row.get(f"n_{key}", 0) + 1
        row["n"] += 1
        n += 1
        if limit is not None and n >= limit:
            break
    if n == 0:
        raise SystemExit(f"{data}: no {category} question of the form 'Where is / What is written "
                         "on the COLOUR SHAPE?'")
    out = {"n": n, "category": category,
           "gather": {k: (v / n).tolist() for k, v in gather.items()}, "lookup": {}}
    for bucket, row in sorted(lookup.items()):
        entry = {"n": row["n"], "target": (row["target"] / row["n"]).tolist()}
        for key in ("same_shape", "same_colour"):
            if key in row:
                entry[key] = (row[key] / row[f"n_{key}"]).tolist()
        out["lookup"][bucket] = entry
    return out


def table(out: dict) -> str:
    lines = [f"{out['n']} {out['category']} questions; attention at the answer position",
             "", "| layer.head | colour word | shape word | " + " | ".join(
                 f"{b} ({e['n']}): target / same shape / same colour" for b, e in out["lookup"].items())
             + " |", "|---|---:|---:|" + "---:|" * len(out["lookup"])]
    layers = len(out["gather"]["colour"])
    for li in range(layers):
        for h in range(len(out["gather"]["colour"][li])):
            cells = []
            for e in out["lookup"].values():
                parts = [f"{e['target'][li][h]:.2f}"]
                parts += [f"{e[k][li][h]:.2f}" if k in e else "-" for k in ("same_shape", "same_colour")]
                cells.append(" / ".join(parts))
            lines.append(f"| {li}.{h} | {out['gather']['colour'][li][h]:.2f} | "
                         f"{out['gather']['shape'][li][h]:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, type=Path, help="a synthetic split's data.json")
    ap.add_argument("--image-folder", type=Path, default=None, help="default: data.json's folder")
    ap.add_argument("--category", default="position", choices=("position", "glyph"))
    ap.add_argument("--limit", type=int, default=None, help="at most this many questions")
    ap.add_argument("--tasks", default=None, help="the --tasks the split was made with")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: no such file")
    from minigem.checkpoints.native import load_model

    model = load_model(args.model, device="cpu").eval()
    out = analyse(model, args.data, args.image_folder or args.data.parent, args.category, args.limit,
                  args.tasks.split(",") if args.tasks else None)
    print(json.dumps(out) if args.json else table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
