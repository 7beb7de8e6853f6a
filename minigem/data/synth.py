"""The synthetic world: deterministic scenes of coloured shapes with questions and answers.

Used to train and evaluate tiny VLMs on CPU, on the fly (`SynthSource`) or written to disk
in LLaVA format (`write_dataset`). A scene is 1-4 objects on a 3x3 grid (at most one per
cell, every colour+shape pair unique in a scene); some objects carry a tiny glyph drawn with
the bitmap font below, legible at the full image size but not after a 4x downscale (the
low-res input), which is what a high-res vision branch is for. Everything is a pure function
of ``(seed, index)``: the same arguments give the same scene, text and image bytes.
See docs/synthetic-world.md.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw

from minigem.data.records import Message, Sample, text_length
from minigem.errors import DataError
from minigem.fileio import atomic_write

CATEGORIES: tuple[str, ...] = (
    "caption", "color", "shape", "count", "position", "existence", "glyph", "conversation",
    "generation", "glyphs", "object", "gen_context",
)
# Fixed mix of categories (renormalised over the `tasks` a caller keeps). `generation`,
# `glyphs`, `object` and `gen_context` have weight 0 so the default mix (and every existing record) is
# unchanged: each is drawn only when a config's `mix` names it, or when `tasks` names it (then
# with its TASK_WEIGHT).
MIX: dict[str, float] = {
    "caption": 0.15, "color": 0.1, "shape": 0.1, "count": 0.1, "position": 0.1,
    "existence": 0.1, "glyph": 0.15, "conversation": 0.2, "generation": 0.0, "glyphs": 0.0,
    "object": 0.0, "gen_context": 0.0,
}
TASK_WEIGHT: dict[str, float] = {"generation": 0.15, "glyphs": 0.15, "object": 0.1,
                                 "gen_context": 0.15}
GLYPHS_PROMPT = "What is written in the image?"
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 30), "purple": (140, 60, 190), "orange": (250, 140, 20),
}
# Glyph ink: white on dark fills, black on light ones (always high contrast).
INK: dict[str, tuple[int, int, int]] = {
    c: (0, 0, 0) if c in ("yellow", "orange") else (255, 255, 255) for c in COLORS
}
SIZES: dict[str, float] = {"small": 0.55, "large": 0.8}  # shape extent / cell side
# Cell k = 3 * row + col, row 0 at the top.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
GLYPH_SCENE_P = 0.4  # fraction of scenes (outside the `glyph` category) with glyphs
GLYPH_FILL = 0.5  # in a scene with glyphs, the chance that each object carries one
# 5x7 bitmap font (rows top to bottom, "1" = ink). Answers are the lower-case key.
FONT: dict[str, tuple[str, ...]] = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
    "a": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "c": ("01110", "10001", "10000", "10000", "10000", "10001", "01110"),
    "e": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "h": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "k": ("10001", "10010", "10100", "11000", "10100", "10010", "10001"),
    "x": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
}
GLYPHS: tuple[str, ...] = tuple(FONT)
# One font dot = GLYPH_DOT image pixels at every image size. Legibility after a 4x downscale
# depends only on GLYPH_DOT / 4 (LR pixels per dot): at 1 a nearest-template reader is at
# chance on the LR image, at 2 it already reads ~20-30% (see docs/synthetic-world.md).
GLYPH_DOT = 1
MIN_IMAGE_SIZE = 96  # below this a glyph no longer fits inside a small triangle


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str  # "small" | "large"
    cell: int  # 0..8, row-major from the top left
    glyph: str | None = None
    jx: float = 0.0  # jitter inside the cell, in [-1, 1] of the free margin
    jy: float = 0.0

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # sorted by cell
    background: tuple[int, int, int]


# ---------------------------------------------------------------- scenes and rendering


def make_scene(rng: random.Random, *, need_glyph: bool = False, glyph_fill: float = GLYPH_FILL,
               binding: float = 0.0) -> Scene:
    """Draw a scene from `rng` (a `random.Random`); `need_glyph` forces at least one glyph.

    glyph_fill: in a scene with glyphs, the chance that each object carries one (one object always
    does). The draws are the same for every value, so a seed's scenes differ only in their glyphs.
    binding: the chance that a scene of 2-4 objects draws them from 2 shapes x 2 colours, so that
    an object shares its shape or its colour with another and only both together name it (the
    attribute binding a lookup like "the red circle" needs). At 0 no draw is made: the seed's
    scenes are the world's.
    """
    n = rng.randint(1, 4)
    cells = sorted(rng.sample(range(9), n))
    if binding > 0 and n >= 2 and rng.random() < binding:
        pool = [(s, c) for s in rng.sample(SHAPES, 2) for c in rng.sample(tuple(COLORS), 2)]
    else:
        pool = [(s, c) for s in SHAPES for c in COLORS]
    kinds = rng.sample(pool, n)
    glyphed = [False] * n
    if need_glyph or rng.random() < GLYPH_SCENE_P:
        glyphed = [rng.random() < glyph_fill for _ in range(n)]
        glyphed[rng.randrange(n)] = True
    objs = tuple(
        Obj(shape=s, color=c, size=rng.choice(("small", "large")), cell=cell,
            glyph=rng.choice(GLYPHS) if g else None,
            jx=rng.uniform(-1, 1), jy=rng.uniform(-1, 1))
        for cell, (s, c), g in zip(cells, kinds, glyphed, strict=True)
    )
    base = rng.randint(230, 248)
    bg = tuple(min(255, base + rng.randint(-4, 4)) for _ in range(3))
    return Scene(objects=objs, background=bg)  # type: ignore[arg-type]


def _geometry(obj: Obj, image_size: int) -> tuple[float, float, float]:
    """Centre x, y and extent (px) of an object's bounding box."""
    cell = image_size / 3
    extent = SIZES[obj.size] * cell
    slack = 0.7 * (cell - extent) / 2  # keeps >= 1 px of background between cells
    cx = (obj.cell % 3 + 0.5) * cell + obj.jx * slack
    cy = (obj.cell // 3 + 0.5) * cell + obj.jy * slack
    return cx, cy, extent


def glyph_box(obj: Obj, image_size: int) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of `obj`'s glyph; exclusive right/bottom."""
    cx, cy, h = _geometry(obj, image_size)
    if obj.shape == "triangle":  # centre the glyph on the incircle
        side = (h * h + h * h / 4) ** 0.5
        cy = cy + h / 2 - (h * h / 2) / ((h + 2 * side) / 2)
    s = GLYPH_DOT
    left, top = round(cx - 2.5 * s), round(cy - 3.5 * s)
    return left, top, left + 5 * s, top + 7 * s


@lru_cache(maxsize=256)
def glyph_mask(glyph: str, scale: int) -> Image.Image:
    """The glyph as an "L" mask (255 = ink), 5*scale x 7*scale pixels."""
    rows = FONT[glyph]
    data = bytes(255 if ch == "1" else 0 for row in rows for ch in row)
    return Image.frombytes("L", (5, 7), data).resize((5 * scale, 7 * scale), Image.NEAREST)


def render(scene: Scene, image_size: int) -> Image.Image:
    """Draw `scene` as an RGB image of `image_size` x `image_size` pixels."""
    if image_size < MIN_IMAGE_SIZE:
        raise DataError(f"synthetic image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    img = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy, h = _geometry(obj, image_size)
        fill = COLORS[obj.color]
        r = h / 2
        if obj.shape == "circle":
            draw.ellipse([round(cx - r), round(cy - r), round(cx + r), round(cy + r)], fill=fill)
        elif obj.shape == "square":
            q = 0.9 * r  # slightly smaller than the circle so areas are comparable
            draw.rectangle([round(cx - q), round(cy - q), round(cx + q), round(cy + q)], fill=fill)
        elif obj.shape == "triangle":
            pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
            draw.polygon([(round(x), round(y)) for x, y in pts], fill=fill)
        else:  # diamond
            pts = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
            draw.polygon([(round(x), round(y)) for x, y in pts], fill=fill)
        if obj.glyph is not None:
            left, top, _, _ = glyph_box(obj, image_size)
            draw.bitmap((left, top), glyph_mask(obj.glyph, GLYPH_DOT),
                        fill=INK[obj.color])
    return img


# ---------------------------------------------------------------- text


def _describe(obj: Obj) -> str:
    mark = f" marked {obj.glyph}" if obj.glyph is not None else ""
    return f"a {obj.size} {obj.color} {obj.shape}{mark} at the {obj.position}"


def caption(scene: Scene) -> str:
    """Complete description: count, then every object in grid order (size, colour, shape,
    glyph, position)."""
    parts = [_describe(o) for o in scene.objects]
    n = len(parts)
    head = "There is 1 object: " if n == 1 else f"There are {n} objects: "
    body = parts[0] if n == 1 else ", ".join(parts[:-1]) + ", and " + parts[-1]
    return head + body + "."


def read_glyphs(scene: Scene) -> str:
    """Every glyph in the scene in reading order (grid order), comma-separated: "3, a"."""
    return ", ".join(o.glyph for o in scene.objects if o.glyph is not None)


QA = tuple[str, str]


def _ask_color(scene: Scene, rng: random.Random) -> QA | None:
    shapes = [o.shape for o in scene.objects]
    unique = [o for o in scene.objects if shapes.count(o.shape) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return f"What color is the {o.shape}?", o.color


def _ask_shape(scene: Scene, rng: random.Random) -> QA | None:
    colors = [o.color for o in scene.objects]
    unique = [o for o in scene.objects if colors.count(o.color) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return f"What shape is the {o.color} object?", o.shape


def _ask_count(scene: Scene, rng: random.Random) -> QA:
    kind = rng.randrange(3)
    if kind == 0:
        return "How many objects are there?", str(len(scene.objects))
    if kind == 1:
        shape = rng.choice(SHAPES)
        return f"How many {shape}s are there?", str(sum(o.shape == shape for o in scene.objects))
    color = rng.choice(tuple(COLORS))
    n = sum(o.color == color for o in scene.objects)
    return f"How many {color} objects are there?", str(n)


def _ask_position(scene: Scene, rng: random.Random) -> QA:
    o = rng.choice(scene.objects)
    return f"Where is the {o.color} {o.shape}?", o.position


def _ask_existence(scene: Scene, rng: random.Random) -> QA:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        return f"Is there a {color} {shape}?", "yes"
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    color, shape = rng.choice(absent)
    return f"Is there a {color} {shape}?", "no"


def _ask_glyph(scene: Scene, rng: random.Random) -> QA | None:
    marked = [o for o in scene.objects if o.glyph is not None]
    if not marked:
        return None
    o = rng.choice(marked)
    return f"What is written on the {o.color} {o.shape}?", o.glyph  # type: ignore[return-value]


def _ask_object(scene: Scene, rng: random.Random) -> QA:
    """The reverse of `position`: which object is at a place (an occupied cell). The answer is
    worded as a drawing prompt ("an orange circle"), as in-context generation requests need."""
    o = rng.choice(scene.objects)
    return f"What is at the {o.position}?", gen_prompt(o.color, o.shape)


ASKERS: dict[str, Callable[[Scene, random.Random], QA | None]] = {
    "color": _ask_color, "shape": _ask_shape, "count": _ask_count,
    "position": _ask_position, "existence": _ask_existence, "glyph": _ask_glyph,
}
CAPTION_PROMPT = "Describe the image in detail."


def _conversation(scene: Scene, rng: random.Random, max_turns: int = 4) -> list[QA]:
    turns: list[QA] = []
    want = rng.randint(2, max_turns)
    for _ in range(5 * max_turns):  # a few tries: some kinds do not apply, questions must not repeat
        qa = ASKERS[rng.choice(tuple(ASKERS))](scene, rng)
        if qa is not None and all(qa[0] != q for q, _ in turns):
            turns.append(qa)
        if len(turns) == want:
            break
    return turns


QA_TURN_KINDS = (*ASKERS, "object")  # the categories `qa_turns` adds turns of


def _more_turns(scene: Scene, rng: random.Random, first: str, qa_turns: int,
                keep: tuple[str, ...], weights: dict[str, float]) -> list[QA]:
    """0..qa_turns-1 further questions about `scene` (the count drawn uniformly, so a record is as
    often one question as qa_turns), each of a category drawn by the mix's weights among its
    single-question categories; a question is never asked twice, a kind that does not apply
    (glyph, with no glyph in the scene) is skipped. LLaVA's instruction data asks several questions
    per image the same way: each further answer costs a few LLM tokens, not a rendered image and
    two tower passes."""
    kinds = [c for c in keep if c in QA_TURN_KINDS and weights.get(c, 0) > 0]
    want = rng.randint(1, qa_turns) - 1
    asked, out = {first}, []
    for _ in range(5 * qa_turns):
        if len(out) == want or not kinds:
            break
        kind = rng.choices(kinds, weights=[weights[c] for c in kinds])[0]
        qa = _ask_object(scene, rng) if kind == "object" else ASKERS[kind](scene, rng)
        if qa is not None and qa[0] not in asked:
            asked.add(qa[0])
            out.append(qa)
    return out


def _check_tasks(tasks: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if tasks is None:
        return CATEGORIES
    bad = [t for t in tasks if t not in CATEGORIES]
    if bad or not tasks:
        raise DataError(f"unknown synthetic task(s) {bad or '[] (empty)'}; valid: {list(CATEGORIES)}")
    return tuple(dict.fromkeys(tasks))


def make_conversation(
    index: int, seed: int, tasks: list[str] | None = None,
    mix: dict[str, float] | None = None, max_turns: int = 4, qa_turns: int = 1, *,
    glyph_fill: float = GLYPH_FILL, binding: float = 0.0,
) -> tuple[Scene, str, list[Message]]:
    """The scene, category and messages of record `index` (everything but the pixels).

    mix: category weights (default MIX); max_turns: longest conversation (2..max_turns QAs).
    qa_turns: a single-question record (colour, shape, existence, count, position, glyph, object)
    asks 1..qa_turns questions about its scene (`_more_turns`); its first turn, scene and category
    are those it has with qa_turns=1.
    glyph_fill: in the scenes of glyph questions (`glyph`, `glyphs`), the chance that each object
    carries a glyph (`make_scene`); at 1.0 every object does, so a question about one glyph can
    only be answered by finding its object. Other categories' scenes keep the default.
    binding: `make_scene`'s, for every record's scene (0: the world's scenes).
    """
    keep = _check_tasks(tasks if mix is None else list(mix))
    weights = MIX if mix is None else mix
    if mix is None and tasks is not None:
        weights = {**MIX, **{t: w for t, w in TASK_WEIGHT.items() if t in keep}}
    rng = random.Random(f"minigem-synth/{seed}/{index}")
    category = rng.choices(keep, weights=[weights[c] for c in keep])[0]
    if category in ("generation", "gen_context"):
        # `gen_context` draws only the in-context kind; its records are generation records
        scene, messages = _generation(rng, in_context=True if category == "gen_context" else None,
                                      binding=binding)
        return scene, "generation", messages
    asks_glyph = category in ("glyph", "glyphs")
    for _ in range(50):
        scene = make_scene(rng, need_glyph=asks_glyph,
                           glyph_fill=glyph_fill if asks_glyph else GLYPH_FILL, binding=binding)
        if category == "caption":
            turns: list[QA] = [(CAPTION_PROMPT, caption(scene))]
        elif category == "glyphs":
            turns = [(GLYPHS_PROMPT, read_glyphs(scene))]
        elif category == "object":
            turns = [_ask_object(scene, rng)]
        elif category == "conversation":
            turns = _conversation(scene, rng, max_turns)
        else:
            qa = ASKERS[category](scene, rng)
            turns = [qa] if qa is not None else []
        if turns:
            break
    else:  # pragma: no cover - every category applies to a single-object scene
        raise RuntimeError(f"could not build a {category} record for index {index}")
    if qa_turns > 1 and category in QA_TURN_KINDS:
        turns += _more_turns(scene, rng, turns[0][0], qa_turns, keep, weights)
    messages: list[Message] = []
    for k, (q, a) in enumerate(turns):
        messages.append(Message("user", ("<image>\n" if k == 0 else "") + q))
        messages.append(Message("assistant", a))
    return scene, category, messages


# ---------------------------------------------------------------- generation requests
#
# Mini-Gemini's two kinds of generation data, in miniature. A user turn ending in " <GEN>"
# asks for a picture; the answer is a short sentence and exactly one "<h>...</h>" span holding
# a normalised drawing prompt (count, size, colour, shape, position) for a text-to-image model.
# (a) re-caption: a text-only request, worded freely, rewritten into the normalised prompt;
# (b) in-context: the request refers to the scene image ("the red object from this picture"),
# so the prompt must be filled in from what the image shows.

GEN_TOKEN, SPAN_OPEN, SPAN_CLOSE = "<GEN>", "<h>", "</h>"
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
GEN_SIZES: dict[str, str] = {"small": "small", "large": "big"}  # world size -> prompt word
_GEN_REPLIES: tuple[str, ...] = ("Sure.", "Here it is.", "Drawing it now.")


def position_phrase(position: str) -> str:
    """'left' -> 'on the left', 'center' -> 'in the center', 'top left' -> 'at the top left'."""
    if position in ("left", "right"):
        return f"on the {position}"
    if position == "center":
        return "in the center"
    return f"at the {position}"


def gen_prompt(color: str, shape: str, count: int = 1, size: str | None = None,
               position: str | None = None) -> str:
    """The normalised drawing prompt: 'a green triangle', 'two big blue squares on the left'."""
    words = ([GEN_SIZES[size]] if size else []) + [color, shape + ("s" if count > 1 else "")]
    head = COUNT_WORDS[count] if count > 1 else "an" if words[0][0] in "aeiou" else "a"
    text = " ".join([head, *words])
    return text + (" " + position_phrase(position) if position else "")


def _recaption(rng: random.Random) -> tuple[str, str]:
    """A free-form text-only request and its normalised prompt."""
    color, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
    count = rng.choice((1, 1, 1, 2, 3))
    size = rng.choice((None, None, "small", "large"))
    position = rng.choice(POSITIONS) if rng.random() < 0.4 else None
    prompt = gen_prompt(color, shape, count, size, position)
    kind = rng.randrange(4)
    if kind == 0:  # the prompt itself, after a verb
        verb = rng.choice(("draw", "make a picture of", "generate an image of", "paint",
                           "show me a picture of", "can you draw"))
        return f"{verb} {prompt}", prompt
    noun = "a" if count == 1 else COUNT_WORDS[count]
    things = shape + ("s" if count > 1 else "")
    sized = f"{GEN_SIZES[size]} " if size else ""
    where = f", {position_phrase(position)}" if position else ""
    if kind == 1:  # colour after the noun
        tail = "make it" if count == 1 else "make them"
        return f"draw {noun} {sized}{things}{where}, {tail} {color}", prompt
    if kind == 2:
        each = "" if count == 1 else "all "
        return f"I would like a picture with {noun} {sized}{things}{where}, {each}{color}", prompt
    one = COUNT_WORDS[count] if count > 1 else "one"
    return f"picture: {one} {sized}{things}, {color}{where}", prompt


def _in_context(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    """A request about the scene image, or None if the drawn kind does not apply."""
    objs = scene.objects
    colors = [o.color for o in objs]
    shapes = [o.shape for o in objs]
    kind = rng.randrange(5)
    if kind == 0:  # by colour, resized
        cand = [o for o in objs if colors.count(o.color) == 1]
        if not cand:
            return None
        o = rng.choice(cand)
        size = rng.choice(("small", "large"))
        return (f"draw the {o.color} object from this picture as a {GEN_SIZES[size]} one",
                gen_prompt(o.color, o.shape, size=size))
    if kind == 1:  # by shape, recoloured
        cand = [o for o in objs if shapes.count(o.shape) == 1]
        if not cand:
            return None
        o = rng.choice(cand)
        new = rng.choice([c for c in COLORS if c != o.color])
        return f"draw the {o.shape} from this picture in {new}", gen_prompt(new, o.shape)
    if kind == 2:  # by position
        o = rng.choice(objs)
        return (f"draw the object at the {o.position} of this picture",
                gen_prompt(o.color, o.shape))
    if kind == 3:  # by colour, several of them
        cand = [o for o in objs if colors.count(o.color) == 1]
        if not cand:
            return None
        o = rng.choice(cand)
        n = rng.choice((2, 3))
        return (f"draw {COUNT_WORDS[n]} of the {o.color} object from this picture",
                gen_prompt(o.color, o.shape, count=n))
    # the whole (small) scene, one object recoloured
    cand = [o for o in objs if shapes.count(o.shape) == 1]
    if len(objs) > 2 or not cand:
        return None
    o = rng.choice(cand)
    new = rng.choice([c for c in COLORS if c != o.color and (c, o.shape) not in
                      {(p.color, p.shape) for p in objs}])
    parts = [gen_prompt(new if p is o else p.color, p.shape, position=p.position) for p in objs]
    return (f"draw a picture like this one but with the {o.shape} in {new}", " and ".join(parts))


def _generation(rng: random.Random, in_context: bool | None = None, binding: float = 0.0,
                ) -> tuple[Scene, list[Message]]:
    """A generation record: (scene, messages); re-caption requests carry no image.
    in_context: None draws the kind (half each); True only requests about the scene image.
    binding: `make_scene`'s."""
    if in_context is None:
        in_context = rng.random() < 0.5
    scene = make_scene(rng, binding=binding)
    if in_context:
        for _ in range(50):
            req = _in_context(scene, rng)
            if req is not None:
                break
            scene = make_scene(rng, binding=binding)
        else:  # pragma: no cover - kind 2 always applies
            raise RuntimeError("could not build an in-context generation request")
    else:
        req = _recaption(rng)
    request, prompt = req
    answer = f"{rng.choice(_GEN_REPLIES)} {SPAN_OPEN}{prompt}{SPAN_CLOSE}"
    user = ("<image>\n" if in_context else "") + f"{request} {GEN_TOKEN}"
    return scene, [Message("user", user), Message("assistant", answer)]


def _record_text(index: int, seed: int, tasks: list[str] | None, mix: dict[str, float] | None,
                 max_turns: int, scene_as_text: bool, qa_turns: int = 1, *,
                 glyph_fill: float = GLYPH_FILL, binding: float = 0.0,
                 ) -> tuple[Scene, str, list[Message]]:
    """make_conversation, with the scene's caption in place of the image if scene_as_text."""
    scene, category, messages = make_conversation(index, seed, tasks, mix, max_turns, qa_turns,
                                                  glyph_fill=glyph_fill, binding=binding)
    if scene_as_text:
        text = caption(scene)
        messages = [Message(m.role, m.content.replace("<image>", text)) for m in messages]
    return scene, category, messages


def check_image_size(image_size: int | Sequence[int]) -> None:
    """A render size, or a non-empty list of them, each at least MIN_IMAGE_SIZE."""
    sizes = [image_size] if isinstance(image_size, int) else list(image_size)
    if not sizes or any(s < MIN_IMAGE_SIZE for s in sizes):
        raise DataError(f"synthetic image_size must be >= {MIN_IMAGE_SIZE} (or a non-empty list of "
                        f"such sizes), got {image_size}")


def render_size(image_size: int | Sequence[int], seed: int, index: int) -> int:
    """The side record `index` is rendered at: `image_size`, or with a list one of its sizes drawn
    per record (deterministic in (seed, index), apart from the record's text: same questions)."""
    if isinstance(image_size, int):
        return image_size
    return image_size[random.Random(f"minigem-size/{seed}/{index}").randrange(len(image_size))]


def make_sample(
    index: int, seed: int, image_size: int | Sequence[int] = 128, tasks: list[str] | None = None,
    mix: dict[str, float] | None = None, max_turns: int = 4, scene_as_text: bool = False,
    qa_turns: int = 1, *, glyph_fill: float = GLYPH_FILL, binding: float = 0.0,
) -> Sample:
    """Record `index` of the world with this seed: one image, deterministic in (seed, index).

    image_size: a list renders each record at one of its sizes (`render_size`): the glyphs are
    5 x 7 pixels at any size, so a model that sees several sizes sees them resampled.
    scene_as_text: the same record with the scene's caption in place of the image (no pixels).
    """
    scene, category, messages = _record_text(index, seed, tasks, mix, max_turns, scene_as_text,
                                             qa_turns, glyph_fill=glyph_fill, binding=binding)
    has_image = any("<image>" in m.content for m in messages)
    return Sample(
        id=f"synth-{seed}-{index:07d}", messages=messages,
        images=[render(scene, render_size(image_size, seed, index))] if has_image else [],
        category=category, source=f"synth(seed={seed})",
    )


class SynthSource:
    """An on-the-fly dataset of `n` synthetic Samples (index i -> make_sample(i, seed, ...))."""

    def __init__(self, n: int, seed: int, image_size: int | Sequence[int] = 128,
                 tasks: list[str] | None = None,
                 mix: dict[str, float] | None = None, max_turns: int = 4,
                 scene_as_text: bool = False, qa_turns: int = 1, *,
                 glyph_fill: float = GLYPH_FILL, binding: float = 0.0):
        if max_turns < 2:
            raise DataError(f"max_turns must be >= 2, got {max_turns}")
        if qa_turns < 1:
            raise DataError(f"qa_turns must be >= 1, got {qa_turns}")
        if not 0.0 <= glyph_fill <= 1.0:
            raise DataError(f"glyph_fill must be in [0, 1], got {glyph_fill}")
        if not 0.0 <= binding <= 1.0:
            raise DataError(f"binding must be in [0, 1], got {binding}")
        if mix is not None and (not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0):
            raise DataError(f"synthetic mix must have non-negative weights with a positive sum, got {mix}")
        self.mix, self.max_turns, self.scene_as_text = mix, max_turns, scene_as_text
        self.qa_turns, self.glyph_fill, self.binding = qa_turns, glyph_fill, binding
        if n < 0:
            raise DataError(f"synthetic dataset size must be >= 0, got {n}")
        check_image_size(image_size)
        self.n, self.seed = n, seed
        self.image_size = image_size if isinstance(image_size, int) else list(image_size)
        self.tasks = list(_check_tasks(tasks))
        self._tasks = None if tasks is None else self.tasks  # None: the default MIX as is

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for SynthSource of size {self.n}")
        return make_sample(i % self.n, self.seed, self.image_size, self._tasks, self.mix,
                           self.max_turns, self.scene_as_text, self.qa_turns,
                           glyph_fill=self.glyph_fill, binding=self.binding)

    def length(self, i: int, tokens_per_image: int) -> int:
        """Record i's length proxy (`text_length`), from its text alone: nothing is drawn."""
        _, _, messages = _record_text(i % self.n, self.seed, self._tasks, self.mix, self.max_turns,
                                      self.scene_as_text, self.qa_turns,
                                      glyph_fill=self.glyph_fill, binding=self.binding)
        return text_length(messages, tokens_per_image)


# ---------------------------------------------------------------- files


def to_llava(sample: Sample, image: str | None) -> dict:
    """A LLaVA-format record ({"id", "image", "category", "conversations"}); a text-only
    record (image None) has no "image" key."""
    who = {"user": "human", "assistant": "gpt"}
    rec = {"id": sample.id, "image": image, "category": sample.category,
           "conversations": [{"from": who[m.role], "value": m.content} for m in sample.messages]}
    if image is None:
        del rec["image"]
    return rec


def write_dataset(
    out_dir: str | os.PathLike, n: int, seed: int, image_size: int = 128,
    tasks: list[str] | None = None,
) -> Path:
    """Write `out_dir/images/<id>.png` and then `out_dir/data.json`; returns data.json's path.

    Every file is written to a temp file and renamed, data.json last, so a data.json on disk
    always describes a complete set of images.
    """
    source = SynthSource(n, seed, image_size, tasks)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        sample = source[i]
        rel = None
        if sample.images:
            rel = f"images/{sample.id}.png"
            atomic_write(out / rel, _png_bytes(sample.images[0]))
        records.append(to_llava(sample, rel))
    path = out / "data.json"
    atomic_write(path, (json.dumps(records, indent=1, ensure_ascii=False) + "\n").encode())
    return path


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def generation_texts(n: int = 512) -> list[str]:
    """Generation requests and answers (markers included), for a tokenizer corpus."""
    texts = [GEN_TOKEN, SPAN_OPEN, SPAN_CLOSE, *_GEN_REPLIES, *COUNT_WORDS, *GEN_SIZES.values()]
    texts += [position_phrase(p) for p in POSITIONS]
    for i in range(n):
        _, msgs = _generation(random.Random(f"minigem-synth/generation-texts/{i}"))
        texts += [m.content.removeprefix("<image>\n") for m in msgs]
    return list(dict.fromkeys(texts))


def world_texts(generation: bool = False) -> list[str]:
    """Every word and phrase the world can produce, every question, and sample captions
    (+ generation requests and answers with `generation`; the default corpus is unchanged)."""
    texts: list[str] = [CAPTION_PROMPT, "How many objects are there?", "yes", "no"]
    texts += list(COLORS) + list(SHAPES) + [f"{s}s" for s in SHAPES] + list(SIZES)
    texts += list(POSITIONS) + list(GLYPHS) + [str(k) for k in range(10)]
    texts += [f"What color is the {s}?" for s in SHAPES]
    texts += [f"How many {s}s are there?" for s in SHAPES]
    for c in COLORS:
        texts += [f"What shape is the {c} object?", f"How many {c} objects are there?"]
        for s in SHAPES:
            texts += [f"Where is the {c} {s}?", f"Is there a {c} {s}?",
                      f"What is written on the {c} {s}?"]
    rng = random.Random("minigem-synth/world-texts")
    texts += [caption(make_scene(rng)) for _ in range(256)]
    if generation:
        texts += generation_texts()
    return list(dict.fromkeys(texts))
