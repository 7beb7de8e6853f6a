"""The synthetic world: determinism, answers consistent with scenes and pixels, glyph legibility
at high-res only, and the LLaVA files written by write_dataset."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from minigem.data import synth
from minigem.data.synth import (
    CATEGORIES,
    COLORS,
    GLYPHS,
    INK,
    Scene,
    SynthSource,
    caption,
    glyph_box,
    glyph_mask,
    make_conversation,
    make_sample,
    make_scene,
    render,
    world_texts,
    write_dataset,
)
from minigem.errors import DataError

# The documented contract, written out independently of the module's tables.
POSITION_NAMES = ["top left", "top", "top right", "left", "center", "right",
                  "bottom left", "bottom", "bottom right"]


def expected_answer(scene: Scene, question: str) -> str:
    """Re-derive the answer to `question` from the scene's objects."""
    objs = scene.objects
    if question == "Describe the image in detail.":
        return caption(scene)
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (o,) = [o for o in objs if o.shape == m[1]]  # must be unique
        return o.color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (o,) = [o for o in objs if o.color == m[1]]
        return o.shape
    if question == "How many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(o.shape == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return str(sum(o.color == m[1] for o in objs))
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if any((o.color, o.shape) == (m[1], m[2]) for o in objs) else "no"
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        (o,) = [o for o in objs if (o.color, o.shape) == (m[1], m[2])]
        return POSITION_NAMES[o.cell]
    if m := re.fullmatch(r"What is at the ([a-z ]+)\?", question):
        (o,) = [o for o in objs if POSITION_NAMES[o.cell] == m[1]]
        return synth.gen_prompt(o.color, o.shape)
    if question == "What is written in the image?":
        return ", ".join(o.glyph for o in sorted(objs, key=lambda o: o.cell) if o.glyph is not None)
    if m := re.fullmatch(r"What is written on the (\w+) (\w+)\?", question):
        (o,) = [o for o in objs if (o.color, o.shape) == (m[1], m[2])]
        assert o.glyph is not None
        return o.glyph
    raise AssertionError(f"unexpected question {question!r}")


def test_every_answer_matches_its_scene() -> None:
    seen: Counter[str] = Counter()
    for i in range(400):
        scene, category, messages = make_conversation(i, seed=7)
        seen[category] += 1
        assert [m.role for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert messages[0].content.startswith("<image>\n")
        assert sum(m.content.count("<image>") for m in messages) == 1
        turns = len(messages) // 2
        assert (2 <= turns <= 4) if category == "conversation" else turns == 1
        for q, a in zip(messages[0::2], messages[1::2], strict=True):
            question = q.content.removeprefix("<image>\n")
            assert a.content == expected_answer(scene, question), (i, question)
            if category not in ("caption", "conversation"):
                assert a.content == a.content.lower() and "." not in a.content
    assert set(seen) == set(CATEGORIES) - {"generation", "glyphs", "object", "gen_context"}, seen


def test_caption_names_every_object() -> None:
    rng = random.Random(1)
    pattern = re.compile(r"a (small|large) (\w+) (\w+)(?: marked (\w))? at the ([a-z ]+?)(?=,|\.$)")
    for _ in range(200):
        scene = make_scene(rng)
        text = caption(scene)
        parsed = [(s, c, sh, g or None, POSITION_NAMES.index(p))
                  for s, c, sh, g, p in pattern.findall(text)]
        truth = [(o.size, o.color, o.shape, o.glyph, o.cell) for o in scene.objects]
        assert parsed == truth, text
        assert text.startswith(f"There {'is' if len(truth) == 1 else 'are'} {len(truth)} object")


def test_scene_invariants_and_glyph_rate() -> None:
    rng = random.Random(2)
    scenes = [make_scene(rng) for _ in range(500)]
    for s in scenes:
        assert 1 <= len(s.objects) <= 4
        assert len({o.cell for o in s.objects}) == len(s.objects)
        assert len({(o.color, o.shape) for o in s.objects}) == len(s.objects)
    rate = np.mean([any(o.glyph for o in s.objects) for s in scenes])
    assert 0.3 < rate < 0.5


def test_pixels_show_the_scene() -> None:
    rng = random.Random(3)
    for _ in range(40):
        scene = make_scene(rng)
        a = np.asarray(render(scene, 128)).astype(int)
        assert a.shape == (128, 128, 3)
        cells = {o.cell: o for o in scene.objects}
        for k in range(9):
            r, c = divmod(k, 3)
            patch = a[round(r * 128 / 3):round((r + 1) * 128 / 3), round(c * 128 / 3):round((c + 1) * 128 / 3)]
            counts = {name: int((patch == rgb).all(-1).sum()) for name, rgb in COLORS.items()}
            if k not in cells:
                assert sum(counts.values()) == 0
                continue
            o = cells[k]
            others = sum(v for n, v in counts.items() if n != o.color)
            assert others == 0
            e = synth.SIZES[o.size] * 128 / 3  # extent of the bounding box
            area = {"circle": np.pi * e * e / 4, "square": (0.9 * e) ** 2}.get(o.shape, e * e / 2)
            assert abs(counts[o.color] / area - 1) < 0.2, (o, counts[o.color], area)


def test_glyphs_sit_inside_their_shape() -> None:
    rng = random.Random(4)
    for size in (96, 128, 256):
        for _ in range(60):
            scene = make_scene(rng, need_glyph=True)
            plain = Scene(tuple(replace(o, glyph=None) for o in scene.objects), scene.background)
            a = np.asarray(render(plain, size))
            for o in scene.objects:
                if o.glyph is not None:
                    left, top, right, bottom = glyph_box(o, size)
                    ring = a[top - 1:bottom + 1, left - 1:right + 1]  # 1 px margin included
                    assert (ring == COLORS[o.color]).all()


def _read_glyphs(img: Image.Image, scenes_objs: list, size: int) -> float:
    """Nearest-template glyph reader: fraction of glyphs read correctly from `img` crops."""
    templates = np.stack([np.asarray(glyph_mask(g, synth.GLYPH_DOT), np.float32) / 255
                          for g in GLYPHS])
    a = np.asarray(img, np.float32)
    right = 0
    for o in scenes_objs:
        left, top, r, b = glyph_box(o, size)
        ink, fill = np.array(INK[o.color], np.float32), np.array(COLORS[o.color], np.float32)
        d = ink - fill
        inkness = np.clip((a[top:b, left:r] - fill) @ d / (d @ d), 0, 1)  # 0 fill .. 1 ink
        guess = GLYPHS[int(np.argmin(((templates - inkness) ** 2).sum((1, 2))))]
        right += guess == o.glyph
    return right / len(scenes_objs)


@pytest.mark.parametrize("size", [128, 256])
def test_glyphs_legible_at_high_res_only(size: int) -> None:
    rng = random.Random(5)
    hr = {"hr": [], "bilinear": [], "box": []}
    for _ in range(120):
        scene = make_scene(rng, need_glyph=True)
        img = render(scene, size)
        marked = [o for o in scene.objects if o.glyph is not None]
        hr["hr"].append((_read_glyphs(img, marked, size), len(marked)))
        for name, method in (("bilinear", Image.BILINEAR), ("box", Image.BOX)):
            low = img.resize((size // 4, size // 4), method)  # the LR input
            back = low.resize((size, size), Image.BILINEAR)
            hr[name].append((_read_glyphs(back, marked, size), len(marked)))
    acc = {k: sum(a * n for a, n in v) / sum(n for _, n in v) for k, v in hr.items()}
    chance = 1 / len(GLYPHS)
    assert acc["hr"] == 1.0, acc
    assert acc["bilinear"] < 2 * chance and acc["box"] < 2 * chance, acc


def test_existence_is_balanced() -> None:
    answers = [make_conversation(i, 11, ["existence"])[2][1].content for i in range(600)]
    assert set(answers) == {"yes", "no"}
    assert 0.43 < answers.count("yes") / len(answers) < 0.57


def test_tasks_restrict_categories_and_bad_tasks_fail() -> None:
    cats = {make_conversation(i, 0, ["count", "glyph"])[1] for i in range(60)}
    assert cats == {"count", "glyph"}
    with pytest.raises(DataError, match=r"unknown synthetic task\(s\) \['colour'\]; valid: \["):
        make_sample(0, 0, tasks=["colour"])
    with pytest.raises(DataError, match="image_size must be >= 96"):
        SynthSource(4, 0, image_size=32)


def test_sample_and_source() -> None:
    s = make_sample(3, 9, image_size=160)
    assert s.id == "synth-9-0000003"
    assert len(s.images) == 1 and s.images[0].mode == "RGB" and s.images[0].size == (160, 160)
    src = SynthSource(5, 9, image_size=160)
    assert len(src) == 5
    again = src[3]
    assert again.messages == s.messages and again.category == s.category
    assert again.images[0].tobytes() == s.images[0].tobytes()
    assert src[-2].id == "synth-9-0000003"
    with pytest.raises(IndexError):
        src[5]
    assert make_sample(3, 10).messages != s.messages or make_sample(4, 9).messages != s.messages


def test_several_render_sizes() -> None:
    """`image_size: [a, b]` renders each record at one of the sizes, drawn per record and
    reproducibly, with the same text as a one-size source; the glyph stage's scenes follow it."""
    from minigem.config import SynthConfig
    from minigem.training.glyph import GlyphScenes

    sizes = [96, 144]
    mixed, plain = SynthSource(40, 7, image_size=sizes), SynthSource(40, 7, image_size=96)
    drawn = [mixed[i].images[0].size[0] for i in range(40) if mixed[i].images]
    assert set(drawn) == set(sizes)  # both sizes occur
    for i in range(40):
        assert mixed[i].messages == plain[i].messages
        if mixed[i].images:
            side = synth.render_size(sizes, 7, i)
            assert mixed[i].images[0].size == (side, side)
            assert mixed[i].images[0].tobytes() == SynthSource(40, 7, image_size=side)[i].images[0].tobytes()

    def processor(images):  # the pixels as they come, to compare renders
        return {"pixel_values_aux": np.asarray(images[0])}

    scenes = GlyphScenes(SynthConfig(n=20, seed=3, image_size=sizes), processor)
    sides = {scenes[i]["pixel_values_aux"].shape[0] for i in range(20)}
    assert sides == set(sizes)
    assert all(scenes[i]["pixel_values_aux"].shape[0] == synth.render_size(sizes, 3, i) for i in range(20))
    for bad in ([], [96, 64]):
        with pytest.raises(DataError, match="image_size must be >= 96"):
            SynthSource(4, 0, image_size=bad)
        with pytest.raises(ValueError, match="image_size must be >= 96"):
            SynthConfig(image_size=bad)


def test_scene_as_text_puts_the_caption_where_the_image_was() -> None:
    from minigem.config import DataConfig
    from minigem.training.data import open_source

    for i in range(40):
        img = make_sample(i, 5)
        txt = make_sample(i, 5, scene_as_text=True)
        scene, _, _ = synth.make_conversation(i, 5)
        assert txt.images == [] and txt.category == img.category and txt.id == img.id
        assert len(txt.messages) == len(img.messages)
        for a, b in zip(img.messages, txt.messages, strict=True):
            assert b.role == a.role and "<image>" not in b.content
            assert b.content == a.content.replace("<image>", synth.caption(scene))
    src = open_source(DataConfig.model_validate({"synth": {"n": 8, "seed": 5, "scene_as_text": True}}))
    assert src[2].messages == make_sample(2, 5, scene_as_text=True).messages and src[2].images == []


def _files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_write_dataset_deterministic_llava(tmp_path) -> None:
    a = write_dataset(tmp_path / "a", n=30, seed=1)
    write_dataset(tmp_path / "b", n=30, seed=1)
    write_dataset(tmp_path / "c", n=30, seed=2)
    fa, fb, fc = (_files(tmp_path / k) for k in "abc")
    assert a == tmp_path / "a" / "data.json"
    assert len(fa) == 31 and sorted(fa) == sorted(fb) and all(fa[k] == fb[k] for k in fa)
    assert fa["data.json"] != fc["data.json"]
    images_a = sorted(v for k, v in fa.items() if k.endswith(".png"))
    images_c = sorted(v for k, v in fc.items() if k.endswith(".png"))
    assert not set(images_a) & set(images_c)  # different seeds: different pictures
    assert not [k for k in fa if not (k == "data.json" or re.fullmatch(r"images/synth-1-\d{7}\.png", k))]

    records = json.loads(a.read_text())
    assert isinstance(records, list) and len(records) == 30
    for i, rec in enumerate(records):
        assert set(rec) == {"id", "image", "category", "conversations"}
        assert rec["id"] == f"synth-1-{i:07d}" and rec["image"] == f"images/{rec['id']}.png"
        assert rec["category"] in CATEGORIES
        conv = rec["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        with Image.open(tmp_path / "a" / rec["image"]) as im:
            assert im.size == (128, 128) and im.mode == "RGB"


def test_world_texts_cover_every_word() -> None:
    texts = world_texts()
    assert len(texts) == len(set(texts))
    vocab = {w for t in texts for w in re.findall(r"[\w]+|[^\w\s]", t)}
    for i in range(300):
        _, _, messages = make_conversation(i, 5)
        for m in messages:
            words = re.findall(r"[\w]+|[^\w\s]", m.content.replace("<image>", ""))
            assert set(words) <= vocab, set(words) - vocab


# ---------------------------------------------------------------- generation requests

COLOR_RE, SHAPE_RE = "|".join(COLORS), "|".join(synth.SHAPES)
OBJ_RE = re.compile(rf"\b({COLOR_RE}) ({SHAPE_RE})s?\b")


def _span(answer: str) -> str:
    assert answer.count("<h>") == 1 and answer.count("</h>") == 1 and answer.endswith("</h>"), answer
    inner = answer[answer.index("<h>") + 3: -4]
    assert inner.strip() == inner and inner, answer
    return inner


@pytest.mark.parametrize("task", ["generation", "gen_context"])
def test_generation_records_are_well_formed_and_match_the_scene(task: str) -> None:
    """`gen_context` (opt-in) draws only requests about the scene image; its records are
    `generation` records (scored as such by `minigem eval`)."""
    kinds: Counter[str] = Counter()
    for i in range(400):
        scene, category, messages = make_conversation(i, seed=5, tasks=[task])
        assert category == "generation" and [m.role for m in messages] == ["user", "assistant"]
        request, answer = messages[0].content, messages[1].content
        assert request.endswith(" <GEN>") and request.count("<GEN>") == 1
        assert "<h>" not in request and "<GEN>" not in answer
        prompt = _span(answer)
        named = OBJ_RE.findall(prompt)
        assert named, prompt
        objs = {(o.color, o.shape): o for o in scene.objects}
        if not request.startswith("<image>\n"):  # re-caption: every colour and shape comes from the text
            kinds["recaption"] += 1
            assert "<image>" not in request
            (color, shape), = set(named)
            assert color in request and shape in request, (request, prompt)
            continue
        kinds["in_context"] += 1
        q = request.removeprefix("<image>\n").removesuffix(" <GEN>")
        if m := re.fullmatch(rf"draw the ({COLOR_RE}) object from this picture as a (big|small) one", q):
            (o,) = [o for o in scene.objects if o.color == m[1]]
            assert prompt == f"a {m[2]} {o.color} {o.shape}"
        elif m := re.fullmatch(rf"draw the ({SHAPE_RE}) from this picture in ({COLOR_RE})", q):
            (o,) = [o for o in scene.objects if o.shape == m[1]]
            assert named == [(m[2], o.shape)] and m[2] != o.color
        elif m := re.fullmatch(r"draw the object at the ([a-z ]+) of this picture", q):
            (o,) = [o for o in scene.objects if POSITION_NAMES[o.cell] == m[1]]
            assert named == [(o.color, o.shape)]
        elif m := re.fullmatch(rf"draw (two|three) of the ({COLOR_RE}) object from this picture", q):
            (o,) = [o for o in scene.objects if o.color == m[2]]
            assert prompt == f"{m[1]} {o.color} {o.shape}s"
        elif m := re.fullmatch(rf"draw a picture like this one but with the ({SHAPE_RE}) in ({COLOR_RE})", q):
            assert len(named) == len(scene.objects) <= 2
            for (color, shape), o in zip(named, scene.objects, strict=True):
                assert shape == o.shape and color == (m[2] if o.shape == m[1] else o.color)
                assert POSITION_NAMES[o.cell] in prompt
        else:
            raise AssertionError(f"unexpected request {q!r}")
        kinds[q.split()[1] + " " + q.split()[2]] += 1  # "the object", "the red", "a picture", ...
        assert objs  # the scene is the picture the request refers to
    if task == "generation":
        assert min(kinds["recaption"], kinds["in_context"]) > 120, kinds
    else:
        assert kinds["recaption"] == 0 and kinds["in_context"] == 400, kinds
        assert kinds["the object"] > 60 and kinds["a picture"] > 20, kinds  # by position, whole scene


def test_generation_needs_naming_and_leaves_other_records_unchanged() -> None:
    # default mix: never drawn; other categories never contain the markers
    for i in range(300):
        _, category, messages = make_conversation(i, seed=3)
        assert category != "generation"
        assert not any(t in m.content for m in messages for t in ("<GEN>", "<h>", "</h>"))
    # a mix naming it: a record of any other category is the one a mix without it would give
    mix = {**synth.MIX, "generation": 0.3}
    cats = Counter()
    for i in range(300):
        scene, category, messages = make_conversation(i, seed=3, mix=mix)
        cats[category] += 1
        if category != "generation":
            assert (scene, category, messages) == make_conversation(i, seed=3, tasks=[category])
    assert 0.2 < cats["generation"] / 300 < 0.4, cats
    # tasks naming it: drawn (with its own weight), so tasks=[generation] works
    assert {make_conversation(i, 0, tasks=["generation"])[1] for i in range(20)} == {"generation"}
    mixed = Counter(make_conversation(i, 0, tasks=["color", "generation"])[1] for i in range(200))
    assert set(mixed) == {"color", "generation"}


def test_generation_sample_images_and_files(tmp_path) -> None:
    samples = [make_sample(i, 4, image_size=96, tasks=["generation"]) for i in range(40)]
    for s in samples:
        assert len(s.images) == s.messages[0].content.count("<image>") <= 1
    assert any(s.images for s in samples) and any(not s.images for s in samples)
    path = write_dataset(tmp_path / "g", n=20, seed=4, image_size=96, tasks=["generation"])
    records = json.loads(path.read_text())
    pngs = sorted(p.name for p in (tmp_path / "g" / "images").iterdir())
    assert pngs == sorted(f"{r['id']}.png" for r in records if "image" in r)
    from minigem.data.llava_json import LlavaJsonDataset

    ds = LlavaJsonDataset(path)
    for i, rec in enumerate(records):
        s = ds[i]
        assert s.category == "generation" and len(s.images) == ("image" in rec)
        assert s.messages[-1].content == rec["conversations"][-1]["value"]


def test_cli_data_synth_generation(tmp_path, capsys) -> None:
    from minigem.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--n", "6", "--tasks", "generation",
                 "--image-size", "96"]) == 0
    records = json.loads((tmp_path / "d" / "data.json").read_text())
    assert {r["category"] for r in records} == {"generation"}
    assert all(r["conversations"][0]["value"].endswith(" <GEN>") for r in records)


def test_gen_prompt_wording() -> None:
    assert synth.gen_prompt("green", "triangle") == "a green triangle"
    assert synth.gen_prompt("orange", "circle") == "an orange circle"
    assert synth.gen_prompt("blue", "square", 2, position="left") == "two blue squares on the left"
    assert synth.gen_prompt("red", "diamond", size="large", position="top left") == \
        "a big red diamond at the top left"
    assert synth.gen_prompt("red", "circle", position="center") == "a red circle in the center"


def test_generation_tokenizer_corpus() -> None:
    from minigem.config import ModelConfig
    from minigem.training.build import train_world_tokenizer

    def cfg(corpus):
        return ModelConfig.model_validate({"llm": {"arch": "llama"}, "system_prompt": "",
                                           "tokenizer_train": {"corpus": corpus, "vocab_size": 512}})

    plain, gen = train_world_tokenizer(cfg("synth")), train_world_tokenizer(cfg("synth+generation"))
    assert world_texts() == world_texts(generation=False)  # the default corpus is unchanged
    assert set(world_texts()) < set(world_texts(generation=True))
    for marker in ("<GEN>", "<h>", "</h>"):
        assert len(gen.encode(marker)) == 1 and len(plain.encode(marker)) > 1
        assert marker not in gen.all_special_tokens  # plain text: decoding keeps it
    total = {"synth": 0, "gen": 0}
    for i in range(50):
        _, _, msgs = make_conversation(i, 9, tasks=["generation"])
        for m in msgs:
            text = m.content.removeprefix("<image>\n")
            ids = gen.encode(text)
            assert gen.decode(ids, skip_special_tokens=True) == text
            total["gen"] += len(ids)
            total["synth"] += len(plain.encode(text))
    assert total["gen"] < 0.7 * total["synth"], total


def test_glyphs_task_reads_every_glyph_in_order() -> None:
    """`glyphs` (drawn only when asked for): every scene has a glyph, and the answer lists
    all of them in grid order."""
    for i in range(60):
        scene, category, messages = make_conversation(i, seed=3, tasks=["glyphs"])
        assert category == "glyphs"
        marked = [o for o in scene.objects if o.glyph is not None]
        assert marked and messages[0].content == "<image>\nWhat is written in the image?"
        assert messages[1].content.split(", ") == [o.glyph for o in sorted(marked, key=lambda o: o.cell)]


def test_object_task_names_what_is_at_a_place() -> None:
    """`object` (opt-in): "What is at the left?" -> the object there, worded as a drawing
    prompt ("an orange circle"); only occupied cells are asked about."""
    seen = set()
    for i in range(80):
        scene, category, messages = make_conversation(i, seed=4, tasks=["object"])
        assert category == "object" and len(messages) == 2
        q = messages[0].content.removeprefix("<image>\n")
        assert messages[1].content == expected_answer(scene, q)
        seen.add(messages[1].content.split()[0])
    assert seen == {"a", "an"}


def test_qa_turns_ask_more_questions_about_the_same_scene() -> None:
    """`qa_turns: 3`: a single-question record asks 1..3 questions about its scene, every answer
    right, none repeated, kinds drawn from the mix (never a category the mix leaves out); its first
    turn, scene and category are those of qa_turns 1; other records are unchanged; a training
    source passes it on; 0 is an error."""
    mix = {"color": 1.0, "glyph": 1.0, "object": 1.0, "generation": 0.5, "caption": 0.2}
    turns: Counter[int] = Counter()
    kinds: set[str] = set()
    for i in range(300):
        one = make_conversation(i, 11, mix=mix)
        scene, category, messages = make_conversation(i, 11, mix=mix, qa_turns=3)
        assert category == one[1] and scene == one[0] and messages[:2] == one[2][:2]
        if category in ("generation", "caption"):
            assert messages == one[2]
            continue
        questions = [m.content.removeprefix("<image>\n") for m in messages[0::2]]
        assert len(set(questions)) == len(questions)
        assert sum(m.content.count("<image>") for m in messages) == 1
        for q, a in zip(questions, messages[1::2], strict=True):
            assert a.content == expected_answer(scene, q), (i, q)
            kinds.add("color" if q.startswith("What color") else
                      "object" if q.startswith("What is at") else
                      "glyph" if q.startswith("What is written") else q)
        turns[len(questions)] += 1
    assert set(turns) == {1, 2, 3} and min(turns.values()) > 40, turns
    assert kinds == {"color", "glyph", "object"}, kinds
    src = SynthSource(20, 11, 96, mix=mix, qa_turns=3)
    assert any(len(src[i].messages) > 2 for i in range(20))
    with pytest.raises(DataError, match="qa_turns must be >= 1, got 0"):
        SynthSource(5, 1, qa_turns=0)


def test_glyph_fill_puts_a_glyph_on_every_object_of_glyph_questions() -> None:
    """`glyph_fill: 1.0`: every object in a glyph question's scene carries a glyph, so one glyph
    alone no longer answers; objects, cells and questions' targets stay the seed's, other
    categories' records are unchanged; the default is the world's 0.5; a training source passes
    it on; a value outside [0, 1] is an error (in the source and in the recipe's config)."""
    from minigem.config import SynthConfig

    mix = {"glyph": 1.0, "color": 1.0}
    n_glyphs: Counter[int] = Counter()
    for i in range(300):
        scene, category, messages = make_conversation(i, 7, mix=mix, glyph_fill=1.0)
        base = make_conversation(i, 7, mix=mix)
        assert category == base[1]
        assert [(o.shape, o.color, o.cell) for o in scene.objects] == \
            [(o.shape, o.color, o.cell) for o in base[0].objects]
        if category != "glyph":
            assert (scene, category, messages) == base
            continue
        assert all(o.glyph is not None for o in scene.objects)
        assert messages[1].content == expected_answer(scene, messages[0].content.split("\n")[1])
        n_glyphs[sum(o.glyph is not None for o in base[0].objects)] += 1
    assert n_glyphs[1] > 40  # the default leaves many glyph questions with one glyph in the scene
    src = SynthSource(30, 7, 96, mix={"glyph": 1.0}, glyph_fill=1.0)
    sample = src[3]
    assert sample.category == "glyph"
    scene = make_conversation(3, 7, mix={"glyph": 1.0}, glyph_fill=1.0)[0]
    assert all(o.glyph for o in scene.objects) and sample.messages == \
        make_conversation(3, 7, mix={"glyph": 1.0}, glyph_fill=1.0)[2]
    with pytest.raises(DataError, match=r"glyph_fill must be in \[0, 1\], got 1.5"):
        SynthSource(5, 1, glyph_fill=1.5)
    with pytest.raises(ValueError, match="glyph_fill"):
        SynthConfig(n=5, glyph_fill=-0.1)


def test_binding_scenes_share_shapes_and_colours() -> None:
    """`binding: p`: about p of the scenes of 2-4 objects draw them from 2 shapes x 2 colours, so
    an object shares its shape or colour with another; every answer (questions and generation
    requests) still matches its scene; 0 leaves the seed's records as they are; a value outside
    [0, 1] is an error (in the source and in the recipe's config)."""
    from minigem.config import SynthConfig

    mix = {"position": 1.0, "glyph": 1.0, "color": 1.0, "count": 1.0, "gen_context": 1.0}
    small, shared = 0, 0
    for i in range(400):
        scene, category, messages = make_conversation(i, 3, mix=mix, binding=0.5)
        objs = scene.objects
        if len(objs) >= 2:
            small += 1
            shared += len({o.shape for o in objs}) <= 2 and len({o.color for o in objs}) <= 2
        assert len({(o.shape, o.color) for o in objs}) == len(objs)
        if category == "generation":
            assert re.search(r"<h>.+</h>", messages[1].content)
            continue
        question = messages[0].content.removeprefix("<image>\n")
        assert messages[1].content == expected_answer(scene, question), (i, question)
    # 0.5 of the scenes by the option, plus the world's own 2-object scenes that happen to share
    assert 0.45 * small < shared < 0.8 * small, (shared, small)
    src = SynthSource(10, 3, 96, mix=mix, binding=1.0)
    assert src[0].messages == make_conversation(0, 3, mix=mix, binding=1.0)[2]
    with pytest.raises(DataError, match=r"binding must be in \[0, 1\], got 2"):
        SynthSource(5, 1, binding=2)
    with pytest.raises(ValueError, match="binding"):
        SynthConfig(n=5, binding=1.5)


# Records of a split written by `minigem data synth --seed 20261206 --image-size 96` before
# `glyph_fill` and `binding` existed: their defaults must draw the same scenes and glyphs.
OLD_RECORDS = [
    (4, "What is written on the red circle?", "8"), (14, "How many squares are there?", "2"),
    (16, "What color is the square?", "purple"), (17, "What is written on the red triangle?", "9"),
    (18, "What is written on the yellow square?", "x"), (24, "What color is the circle?", "green"),
    (27, "What is written on the orange diamond?", "k"),
    (31, "What is written on the yellow square?", "k"),
    # these four change when each object's glyph chance moves off 0.5 (to 0.45 or 0.55)
    (82, "What is written on the blue triangle?", "4"), (109, "What is written on the red diamond?", "5"),
    (148, "What is written on the blue square?", "4"),
    (170, "What is written on the orange diamond?", "3"),
]


def test_default_options_keep_the_worlds_records() -> None:
    for index, question, answer in OLD_RECORDS:
        _, _, messages = make_conversation(index, 20261206)
        assert (messages[0].content, messages[1].content) == (f"<image>\n{question}", answer)
