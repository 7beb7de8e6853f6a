"""The `minigem` command: chat (one-shot, JSON, interactive), data synth, eval, and the one-line
errors (exit status 2) a user sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from minigem.cli import main
from minigem.data.records import Message


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (30, 20), (220, 30, 30)).save(path)
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _last_err(err: str) -> str:
    return err.strip().splitlines()[-1]


# ----------------------------------------------------------------------- chat


def test_chat_json(tiny_model, tiny_saved_model, image, capsys):
    q = "What color is the circle?"
    code, out, err = _run(capsys, "chat", "--model", str(tiny_saved_model), "--image", str(image),
                          q, "--json", "--max-new-tokens", "6")
    assert code == 0, err
    want = tiny_model.chat(Image.open(image).convert("RGB"), q, max_new_tokens=6)
    assert json.loads(out) == {"text": want}
    assert out.count("\n") == 1  # one JSON line, nothing else on stdout


def test_chat_plain_with_options(tiny_model, tiny_saved_model, image, capsys):
    q = "Where is the red circle?"
    code, out, _ = _run(capsys, "chat", "--model", str(tiny_saved_model), "--image", str(image),
                        "--image", str(image), q, "--max-new-tokens", "5", "--temperature", "1.2",
                        "--seed", "3")
    assert code == 0
    img = Image.open(image).convert("RGB")
    assert out == tiny_model.chat([img, img], q, max_new_tokens=5, temperature=1.2, seed=3) + "\n"


def test_chat_device_and_dtype(tiny_model, tiny_saved_model, image, capsys):
    """--device cpu --dtype bf16 runs the model in bf16; --device cpu --dtype fp32 is the
    default's answer exactly."""
    import torch

    from minigem.commands import resolve_device

    q = "What color is the circle?"
    code, out, err = _run(capsys, "chat", "--model", str(tiny_saved_model), "--image", str(image), q,
                          "--max-new-tokens", "4", "--device", "cpu", "--dtype", "fp32")
    assert code == 0, err
    assert out == tiny_model.chat(Image.open(image).convert("RGB"), q, max_new_tokens=4) + "\n"
    code, out, err = _run(capsys, "chat", "--model", str(tiny_saved_model), "--image", str(image), q,
                          "--max-new-tokens", "4", "--device", "cpu", "--dtype", "bf16")
    assert code == 0 and out.strip(), err
    assert resolve_device("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve_device("cpu", "auto") == (torch.device("cpu"), torch.float32)


def test_device_errors(tiny_saved_model, capsys):
    import torch

    code, out, err = _run(capsys, "chat", "--model", str(tiny_saved_model), "hi", "--device", "tpu9")
    assert code == 2 and out == ""
    assert _last_err(err).startswith("error: --device 'tpu9': ")
    if torch.cuda.is_available():
        bad, want = f"cuda:{torch.cuda.device_count()}", "CUDA device(s)"
    else:
        bad, want = "cuda", "no CUDA GPU is available"
    code, _, err = _run(capsys, "eval", "--model", str(tiny_saved_model), "--data", "x.json", "--device", bad)
    assert code == 2 and want in _last_err(err)


def test_chat_missing_image(tiny_saved_model, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    code, out, err = _run(capsys, "chat", "--model", str(tiny_saved_model), "--image", str(missing), "q")
    assert code == 2 and out == ""
    assert _last_err(err) == f"error: image file not found: {missing}"
    assert "Traceback" not in err


def test_chat_unreadable_image(tiny_saved_model, tmp_path, capsys):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 definitely not a jpeg")
    code, _, err = _run(capsys, "chat", "--model", str(tiny_saved_model), "--image", str(junk), "q")
    assert code == 2
    assert _last_err(err).startswith(f"error: cannot read image {junk}: cannot identify image file")


def test_chat_model_dir_errors(tmp_path, capsys):
    missing = tmp_path / "no-model"
    code, out, err = _run(capsys, "chat", "--model", str(missing), "hello")
    assert code == 2 and out == ""
    assert err.strip() == f"error: {missing}: no such model directory"
    code, _, err = _run(capsys, "chat", "--model", str(tmp_path), "hello")
    assert code == 2
    assert err.strip() == f"error: {tmp_path}: not a model directory (no config.json)"


def test_chat_too_many_placeholders(tiny_saved_model, image, capsys):
    code, _, err = _run(capsys, "chat", "--model", str(tiny_saved_model), "--image", str(image),
                        "<image> vs <image>?")
    assert code == 2
    assert _last_err(err) == "error: the prompt has 2 <image> placeholders but 1 images were given"


def test_chat_bad_generation_setting(tiny_saved_model, capsys):
    code, _, err = _run(capsys, "chat", "--model", str(tiny_saved_model), "hi", "--top-p", "0")
    assert code == 2
    assert _last_err(err) == "error: top_p must be in (0, 1], got 0.0"


def test_interactive_chat(tiny_model, tiny_saved_model, image, capsys, monkeypatch):
    q1, q2 = "What color is the circle?", "Where is it?"
    lines = iter([q1, "", q2, "/image", f"/image {image.parent / 'gone.png'}", "/reset", "/quit",
                  "never read"])
    prompts: list[str] = []

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(lines)

    monkeypatch.setattr("builtins.input", fake_input)
    code, out, _ = _run(capsys, "chat", "--model", str(tiny_saved_model), "--image", str(image),
                        "--max-new-tokens", "5")
    assert code == 0
    img = Image.open(image).convert("RGB")
    a1 = tiny_model.chat(img, q1, max_new_tokens=5)
    history = [Message("user", f"<image>\n{q1}"), Message("assistant", a1), Message("user", q2)]
    a2 = tiny_model.chat([img], history, max_new_tokens=5)  # the second turn sees the first
    assert out.splitlines() == [
        "minigem chat. /image PATH adds an image, /reset starts over, /quit exits.",
        f"minigem> {a1}",
        f"minigem> {a2}",
        "error: usage: /image PATH",
        f"error: image file not found: {image.parent / 'gone.png'}",
        "(conversation cleared)",
    ]
    assert prompts == ["you> "] * 7  # stopped reading at /quit


def test_interactive_chat_ends_at_eof(tiny_saved_model, capsys, monkeypatch):
    def eof(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    code, out, _ = _run(capsys, "chat", "--model", str(tiny_saved_model))
    assert code == 0 and out.startswith("minigem chat.")


def test_interactive_image_command(tiny_model, tiny_saved_model, image, capsys, monkeypatch):
    q = "What color is the circle?"
    lines = iter([f"/image {image}", q, "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, _ = _run(capsys, "chat", "--model", str(tiny_saved_model), "--max-new-tokens", "4")
    assert code == 0
    want = tiny_model.chat(Image.open(image).convert("RGB"), q, max_new_tokens=4)
    assert out.splitlines()[1:] == ["(image added; 1 pending)", f"minigem> {want}"]


# ----------------------------------------------------------------------- data synth


def test_data_synth(tmp_path, capsys):
    from minigem.data.synth import write_dataset

    out_dir = tmp_path / "synth"
    code, out, err = _run(capsys, "data", "synth", "--out", str(out_dir), "--n", "5", "--seed", "1")
    assert code == 0
    path = out_dir / "data.json"
    assert out.strip() == str(path)
    assert f"wrote 5 records to {path}" in err
    records = json.loads(path.read_text())
    assert [r["id"] for r in records] == [f"synth-1-{i:07d}" for i in range(5)]
    assert all((out_dir / r["image"]).is_file() for r in records)
    ref = write_dataset(tmp_path / "ref", 5, 1)  # the CLI writes exactly the library's dataset
    assert ref.read_text() == path.read_text()
    assert sorted(p.name for p in (out_dir / "images").iterdir()) == [f"synth-1-{i:07d}.png" for i in range(5)]


def test_data_synth_tasks_and_size(tmp_path, capsys):
    out_dir = tmp_path / "s"
    code, _, _ = _run(capsys, "data", "synth", "--out", str(out_dir), "--n", "4", "--tasks", "color, count",
                      "--image-size", "100")
    assert code == 0
    records = json.loads((out_dir / "data.json").read_text())
    assert {r["category"] for r in records} <= {"color", "count"}
    assert Image.open(out_dir / records[0]["image"]).size == (100, 100)


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "error: --n must be at least 1"),
    (["--n", "2", "--tasks", "color,colour"],
     "error: --tasks: unknown categories ['colour']; valid: caption, color, shape, count, position, "
     "existence, glyph, conversation, generation, glyphs, object, gen_context"),
])
def test_data_synth_errors(tmp_path, capsys, args, message):
    code, _, err = _run(capsys, "data", "synth", "--out", str(tmp_path / "x"), *args)
    assert code == 2
    assert err.strip() == message


# ----------------------------------------------------------------------- eval


def test_eval_json(tiny_saved_model, tiny_data, capsys):
    from minigem.checkpoints.native import load_model
    from minigem.data.llava_json import LlavaJsonDataset
    from minigem.evaluation.runner import evaluate

    code, out, err = _run(capsys, "eval", "--model", str(tiny_saved_model), "--data", str(tiny_data),
                          "--json", "--max-new-tokens", "4", "--batch-size", "5")
    assert code == 0, err
    report = json.loads(out)
    records = json.loads(tiny_data.read_text())
    cats = [r["category"] for r in records]
    short = [c for c in cats if c not in ("caption", "conversation")]
    assert set(report) == {"accuracy", "n_scored", "per_category", "long_form", "spurious_span"}
    assert report["spurious_span"]["n"] == len(cats)  # no generation records: all are checked
    assert report["n_scored"] == len(short)
    assert {c: r["n"] for c, r in report["per_category"].items()} == {c: short.count(c) for c in set(short)}
    assert set(report["long_form"]) == set(cats) - set(short)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in report["per_category"].values())
    expect = evaluate(load_model(tiny_saved_model), LlavaJsonDataset(tiny_data), batch_size=5,
                      max_new_tokens=4)
    assert report == json.loads(json.dumps(expect.to_dict()))


def test_eval_text_and_limit(tiny_saved_model, tiny_data, capsys):
    code, out, _ = _run(capsys, "eval", "--model", str(tiny_saved_model), "--data", str(tiny_data),
                        "--limit", "3", "--max-new-tokens", "2")
    assert code == 0
    head = out.splitlines()[0]
    assert head.startswith("accuracy ") and head.endswith("short-answer records")
    n_short = sum(r["category"] not in ("caption", "conversation")
                  for r in json.loads(tiny_data.read_text())[:3])
    assert f" on {n_short} short-answer records" in head


def test_eval_predictions_file(tiny_saved_model, tiny_data, tmp_path, capsys):
    """--predictions writes one JSON line per record: id, category, prediction, reference and
    its score; the scores add up to the report's numbers."""
    preds = tmp_path / "preds.jsonl"
    code, out, err = _run(capsys, "eval", "--model", str(tiny_saved_model), "--data", str(tiny_data),
                          "--json", "--max-new-tokens", "3", "--predictions", str(preds))
    assert code == 0, err
    report = json.loads(out)
    records = json.loads(tiny_data.read_text())
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r["id"] for r in records]
    assert [x["reference"] for x in lines] == [r["conversations"][-1]["value"] for r in records]
    for cat, r in report["per_category"].items():
        mine = [x["correct"] for x in lines if x["category"] == cat]
        assert len(mine) == r["n"] and sum(mine) / len(mine) == pytest.approx(r["accuracy"])
    for cat, r in report["long_form"].items():
        mine = [x["f1"] for x in lines if x["category"] == cat]
        assert sum(mine) / len(mine) == pytest.approx(r["f1"])
    assert not list(tmp_path.glob(".preds.jsonl.*"))  # written atomically, no temp file left
    # a folder that does not exist is an error before any decoding
    bad = tmp_path / "nope" / "preds.jsonl"
    code, _, err = _run(capsys, "eval", "--model", str(tiny_saved_model), "--data", str(tiny_data),
                        "--predictions", str(bad))
    assert code == 2 and _last_err(err) == f"error: --predictions {bad}: folder {bad.parent} does not exist"


def test_eval_errors(tiny_saved_model, tmp_path, capsys):
    missing = tmp_path / "nope.json"
    code, _, err = _run(capsys, "eval", "--model", str(tiny_saved_model), "--data", str(missing))
    assert code == 2 and _last_err(err) == f"error: {missing}: no such data file"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "q1", "image": "x.png",
                                "conversations": [{"from": "human", "value": "<image>"},
                                                  {"from": "gpt", "value": "a"}]}]))
    code, _, err = _run(capsys, "eval", "--model", str(tiny_saved_model), "--data", str(bad))
    assert code == 2 and _last_err(err) == f"error: {bad}: record q1: image file not found: {tmp_path / 'x.png'}"


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["chat", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
