"""LLaVA JSON/JSONL reading, its error messages, skip_bad, image padding, encoding and collate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minigem.chat import IGNORE_INDEX
from minigem.data.collate import SampleEncoder, collate
from minigem.data.llava_json import LlavaJsonDataset
from minigem.data.records import Message, Sample
from minigem.errors import DataError
from minigem.vision.processing import ImageProcessor, pad_to_square


def _turns(*pairs: str) -> list[dict]:
    out = []
    for k, text in enumerate(pairs):
        out.append({"from": "human" if k % 2 == 0 else "gpt", "value": text})
    return out


def _image(folder: Path, name: str, color=(200, 30, 30), size=(24, 16)) -> str:
    Image.new("RGB", size, color).save(folder / name)
    return name


def _write(folder: Path, records: list, name: str = "data.json") -> Path:
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def _error(path: Path, **kw) -> str:
    with pytest.raises(DataError) as err:
        LlavaJsonDataset(path, **kw)
    return str(err.value)


# ----------------------------------------------------------------------- reading


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_reads_all_record_kinds(tmp_path, name):
    a = _image(tmp_path, "a.png", (255, 0, 0))
    b = _image(tmp_path, "b.png", (0, 0, 255), size=(10, 30))
    records = [
        {"id": "single", "image": a, "category": "color",
         "conversations": _turns("<image>\nWhat color?", "red")},
        {"id": "two", "image": [a, b],
         "conversations": _turns("Compare <image> and <image>.", "They differ.", "Sure?", "Yes.")},
        {"id": "text", "conversations": _turns("Hello?", "Hi.")},
        {"id": "noph", "image": b, "conversations": _turns("What is this?", "blue")},
        {"id": "sys", "conversations": [{"from": "system", "value": "Be brief."}, *_turns("Q", "A")]},
    ]
    ds = LlavaJsonDataset(_write(tmp_path, records, name))
    assert len(ds) == 5 and ds.skipped == 0

    s = ds[0]
    assert s.id == "single" and s.category == "color" and s.source == str(tmp_path / name)
    assert [m.role for m in s.messages] == ["user", "assistant"]
    assert len(s.images) == 1 and s.images[0].getpixel((0, 0)) == (255, 0, 0)

    s = ds[1]
    assert [im.size for im in s.images] == [(24, 16), (10, 30)]  # placeholder order
    assert s.images[1].getpixel((0, 0)) == (0, 0, 255)
    assert [m.role for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert s.category is None

    s = ds[2]
    assert s.images == [] and s.messages == [Message("user", "Hello?"), Message("assistant", "Hi.")]

    s = ds[3]  # LLaVA convention: a single image without placeholder goes first
    assert s.messages[0] == Message("user", "<image>\nWhat is this?")
    assert len(s.images) == 1

    s = ds[4]
    assert s.messages[0] == Message("system", "Be brief.")


def test_image_folder_and_numeric_id(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _image(imgs, "x.png")
    path = _write(tmp_path, [{"id": 7, "image": "x.png", "conversations": _turns("<image>", "a")}])
    assert LlavaJsonDataset(path, image_folder=imgs)[0].id == "7"
    assert _error(path) == f"{path}: record 7: image file not found: {tmp_path / 'x.png'}"


# ----------------------------------------------------------------------- errors


def test_missing_image_file(tmp_path):
    path = _write(tmp_path, [{"id": "r1", "image": "gone.png", "conversations": _turns("<image>\nQ", "A")}])
    assert _error(path) == f"{path}: record r1: image file not found: {tmp_path / 'gone.png'}"


def test_unreadable_image(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    path = _write(tmp_path, [{"id": "r9", "image": "junk.png", "conversations": _turns("<image>\nQ", "A")}])
    ds = LlavaJsonDataset(path)  # structure is fine; the pixels are read lazily
    with pytest.raises(DataError) as err:
        ds[0]
    assert str(err.value).startswith(
        f"{path}: record r9: cannot read image {tmp_path / 'junk.png'}: cannot identify image file"
    )


def test_placeholder_count_mismatch(tmp_path):
    a = _image(tmp_path, "a.png")
    path = _write(tmp_path, [
        {"id": "ok", "image": a, "conversations": _turns("<image>\nQ", "A")},
        {"id": "r2", "image": a, "conversations": _turns("<image> vs <image>", "A")},
    ])
    assert _error(path) == f"{path}: record r2: 2 <image> placeholders but 1 images"
    path = _write(tmp_path, [{"id": "r3", "image": [a, a], "conversations": _turns("Q", "A")}])
    assert _error(path) == f"{path}: record r3: 0 <image> placeholders but 2 images"
    path = _write(tmp_path, [{"id": "r4", "conversations": _turns("<image> Q", "A")}])
    assert _error(path) == f"{path}: record r4: 1 <image> placeholders but 0 images"


def test_bad_role(tmp_path):
    path = _write(tmp_path, [{"id": "r1", "conversations": [
        {"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]}])
    assert _error(path) == f"{path}: record r1: bad role 'bot' (expected human/gpt/system)"


def test_non_alternating_turns(tmp_path):
    path = _write(tmp_path, [{"id": "r1", "conversations": [
        {"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A"}]}])
    assert _error(path) == (
        f"{path}: record r1: turn 2 is from user, expected assistant (turns must alternate)"
    )
    path = _write(tmp_path, [{"id": "r2", "conversations": _turns("Q", "A", "Q2")}])
    assert _error(path) == f"{path}: record r2: the last turn must be the assistant's answer"
    path = _write(tmp_path, [{"id": "r3", "conversations": [{"from": "system", "value": "Be brief."}]}])
    assert _error(path) == f"{path}: record r3: the last turn must be the assistant's answer"


def test_malformed_records(tmp_path):
    path = _write(tmp_path, [{"id": "r1", "conversations": []}])
    assert _error(path) == f"{path}: record r1: missing or empty 'conversations'"
    path = _write(tmp_path, [{"conversations": _turns("Q", "A")}, "oops"])
    assert _error(path) == f"{path}: record #1: expected an object, got str"
    path = _write(tmp_path, [{"id": "r3", "conversations": [{"from": "human", "value": 3}]}])
    assert _error(path) == f"{path}: record r3: each turn needs 'from' and a string 'value'"
    path = _write(tmp_path, [{"id": "r4", "image": 5, "conversations": _turns("Q", "A")}])
    assert _error(path) == f"{path}: record r4: 'image' must be a path or a list of paths"


def test_invalid_json(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"id": "a",]')
    assert _error(path).startswith(f"{path}: not valid JSON: ")
    path.write_text('{"id": "a"}')
    assert _error(path) == f"{path}: expected a list of records at the top level"


def test_invalid_jsonl_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"id": "a", "conversations": _turns("Q", "A")})
    path.write_text(f"{good}\n\n{good}\n{{oops\n")
    assert _error(path) == (
        f"{path}: line 4: not valid JSON: Expecting property name enclosed in double quotes (column 2)"
    )


def test_empty_and_missing_files(tmp_path):
    path = _write(tmp_path, [])
    assert _error(path) == f"{path}: no usable records"
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert _error(path) == f"{path}: no usable records"
    missing = tmp_path / "nope.json"
    assert _error(missing) == f"{missing}: no such data file"


def test_skip_bad_skips_and_counts(tmp_path, caplog):
    a = _image(tmp_path, "a.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG garbage")
    path = _write(tmp_path, [
        {"id": "g1", "image": a, "conversations": _turns("<image>\nQ", "A")},
        {"id": "b1", "image": "gone.png", "conversations": _turns("<image>\nQ", "A")},
        {"id": "g2", "conversations": _turns("Q", "A")},
        {"id": "b2", "conversations": [{"from": "robot", "value": "Q"}]},
        {"id": "bad-pixels", "image": "junk.png", "conversations": _turns("<image>\nQ", "A")},
        {"id": "g3", "conversations": _turns("Q", "A")},
    ])
    with pytest.raises(DataError):
        LlavaJsonDataset(path)
    ds = LlavaJsonDataset(path, skip_bad=True)
    assert [r.id for r in ds.records] == ["g1", "g2", "bad-pixels", "g3"]
    assert ds.skipped == 2
    assert "skipped 2 bad records (data.skip_bad=true)" in caplog.text
    # an unreadable image is found when read: that record is skipped and counted too
    assert ds[2].id == "g3"
    assert ds.skipped == 3
    assert [ds[i].id for i in (0, 1, 3)] == ["g1", "g2", "g3"]


def test_skip_bad_with_nothing_left(tmp_path):
    path = _write(tmp_path, [{"id": "b", "image": "gone.png", "conversations": _turns("<image>", "A")}])
    assert _error(path, skip_bad=True) == f"{path}: no usable records"


# ----------------------------------------------------------------------- images


def _unnormalise(t: torch.Tensor, proc: ImageProcessor) -> np.ndarray:
    mean = np.asarray(proc.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(proc.std, dtype=np.float32)[:, None, None]
    return np.rint((t.numpy() * std + mean) * 255).astype(int).transpose(1, 2, 0)  # [H, W, 3]


def test_pad_to_square_uses_the_mean_colour():
    proc = ImageProcessor(image_size=20, aspect="pad")
    mean_rgb = tuple(int(round(m * 255)) for m in proc.mean)
    assert proc.mean_rgb == mean_rgb == (123, 117, 104)
    wide = Image.new("RGB", (20, 10), (255, 0, 0))
    px = _unnormalise(proc([wide])["pixel_values"][0], proc)  # no resize: already 20 wide
    assert px.shape == (20, 20, 3)
    assert (px[:5] == mean_rgb).all() and (px[15:] == mean_rgb).all()  # bands above/below
    assert (px[5:15] == (255, 0, 0)).all()  # the image, centred

    tall = pad_to_square(Image.new("RGB", (4, 10), (0, 255, 0)), (1, 2, 3))
    arr = np.asarray(tall)
    assert tall.size == (10, 10)
    assert (arr[:, :3] == (1, 2, 3)).all() and (arr[:, 7:] == (1, 2, 3)).all()
    assert (arr[:, 3:7] == (0, 255, 0)).all()
    square = Image.new("RGB", (6, 6))
    assert pad_to_square(square, (0, 0, 0)) is square


def test_square_aspect_stretches():
    proc = ImageProcessor(image_size=16, aspect="square")
    out = proc([Image.new("RGB", (40, 10), (255, 0, 0))])["pixel_values"]
    assert out.shape == (1, 3, 16, 16)
    assert (_unnormalise(out[0], proc) == (255, 0, 0)).all()


def test_processor_shapes_and_normalisation():
    proc = ImageProcessor(image_size=16)
    assert proc([]) == {"pixel_values": None, "pixel_values_aux": None}
    imgs = [Image.new("RGB", (16, 16), (255, 255, 255)), Image.new("L", (30, 30), 0)]
    out = proc(imgs)
    assert out["pixel_values"].shape == (2, 3, 16, 16) and out["pixel_values_aux"] is None
    expect_white = (1 - np.asarray(proc.mean)) / np.asarray(proc.std)
    assert torch.allclose(out["pixel_values"][0, :, 3, 3], torch.tensor(expect_white, dtype=torch.float32))
    expect_black = -np.asarray(proc.mean) / np.asarray(proc.std)
    assert torch.allclose(out["pixel_values"][1, :, 3, 3], torch.tensor(expect_black, dtype=torch.float32))


# ----------------------------------------------------------------------- encoding + collate


def _sample(n_images: int = 1) -> Sample:
    q = "<image>\n" * n_images + "What color is the circle?"
    return Sample("s1", [Message("user", q), Message("assistant", "red"),
                         Message("user", "Is there a blue square?"), Message("assistant", "no")],
                  [Image.new("RGB", (20, 20), (255, 0, 0))] * n_images, "color", "mem")


def test_labels_mask_everything_but_answers(tiny_model):
    enc = SampleEncoder.for_model(tiny_model)
    out = enc(_sample(2))
    ids, labels = out["input_ids"], out["labels"]
    tok = tiny_model.tokenizer
    img = tiny_model.image_token_id
    assert len(ids) == len(labels)
    assert ids.count(img) == 2 * tiny_model.tokens_per_image  # each placeholder expanded
    assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels, strict=True) if t == img)
    kept = [t for t in labels if t != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels, strict=True))
    assert tok.decode(kept) == " red</s> no</s>"  # exactly the assistant turns + end markers
    # everything up to the first answer is context
    first = labels.index(next(lab for lab in labels if lab != IGNORE_INDEX))
    assert tok.decode(ids[:first]).endswith("ASSISTANT:")
    assert out["pixel_values"].shape == (2, 3, 16, 16) and out["category"] == "color"


def test_encoder_placeholder_mismatch(tiny_model):
    enc = SampleEncoder.for_model(tiny_model)
    s = _sample(1)
    s.images = s.images * 2
    with pytest.raises(DataError) as err:
        enc(s)
    assert str(err.value) == "mem: record s1: 1 <image> placeholders but 2 images"


def test_encoder_too_long_names_the_record(tiny_model):
    enc = SampleEncoder.for_model(tiny_model)
    enc.max_length = 3
    with pytest.raises(DataError) as err:
        enc(_sample(1))
    assert str(err.value).startswith("mem: record s1: the sequence needs ")


def _rows():
    return [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "pixel_values": torch.zeros(1, 3, 2, 2)},
        {"input_ids": [8], "labels": [8], "pixel_values": None},
        {"input_ids": [9, 10], "labels": [-100, -100], "pixel_values": torch.ones(2, 3, 2, 2)},
    ]


def test_collate_right_padding():
    out = collate(_rows(), pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [-100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    pv = out["pixel_values"]
    assert pv.shape == (3, 3, 2, 2) and pv[0].sum() == 0 and (pv[1:] == 1).all()  # row order kept
    assert out["pixel_values_aux"] is None


def test_collate_left_padding():
    out = collate(_rows(), pad_id=3, left=True)
    assert out["input_ids"].tolist() == [[5, 6, 7], [3, 3, 8], [3, 9, 10]]
    assert out["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8], [-100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_collate_text_only_batch():
    out = collate([{"input_ids": [1, 2], "labels": [1, 2]}], pad_id=0)
    assert out["pixel_values"] is None and out["input_ids"].tolist() == [[1, 2]]
