"""Any-to-any generation: the <GEN>/<h> markers, the diffusers bridge (tiny random pipelines
built here, no downloads), chat with images in the API, the CLI (`chat --gen`) and the server."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ANSWER, PROMPT, SHOWN, build_tiny_sd, scripted
from PIL import Image

from minigem.cli import main
from minigem.data.records import Message
from minigem.errors import ImagePipelineError, MinigemError
from minigem.imagegen import bridge as bridge_mod
from minigem.imagegen.bridge import DiffusionBridge, parse_size
from minigem.imagegen.chat import ChatResult
from minigem.imagegen.markers import (
    MarkerFilter,
    add_gen_marker,
    add_gen_marker_to_messages,
    extract_prompt,
    strip_markers,
)

# ----------------------------------------------------------------------- markers


@pytest.mark.parametrize("answer,prompt", [
    (ANSWER, PROMPT),
    ("no markers at all", None),
    ("first <h>one</h> then <h>two</h>", "two"),  # the last span wins
    ("<h>done</h> and <h>cut off by max tokens", "done"),
    ("<h>cut off by max tokens", None),  # the only span is unclosed
    ("<h></h>", None),
    ("<h> \n\t </h>", None),
    ("<h>\n  a   red\tcircle \n</h>", "a red circle"),
    ("a <h>outer <h>inner</h> tail</h>", "inner"),
    ("</h>stray close <h>x</h>", "x"),
])
def test_extract_prompt(answer, prompt):
    assert extract_prompt(answer) == prompt


@pytest.mark.parametrize("answer,shown", [
    (ANSWER, SHOWN),
    ("a:<h>red circle</h>!", "a: red circle!"),
    ("<h> x </h> done", "x done"),
    ("draw<h>one</h>and<h>two</h>", "draw one and two"),
    ("(<h>x</h>)", "(x)"),
    ("x<GEN>", "x"),
    ("plain text, a < b", "plain text, a < b"),
    ("<hr> is not a marker", "<hr> is not a marker"),
])
def test_strip_markers(answer, shown):
    assert strip_markers(answer) == shown


@pytest.mark.parametrize("text", [ANSWER, "a <h>b</h> c <h", "x<GEN>y <h>  z </h>.", "<<h>>", "a <"])
def test_marker_filter_streams_like_strip(text):
    for step in (1, 2, 3, 5):
        f = MarkerFilter()
        out = "".join(f.feed(text[i:i + step]) for i in range(0, len(text), step)) + f.flush()
        assert out.strip() == strip_markers(text)


def test_marker_filter_holds_back_only_possible_markers():
    f = MarkerFilter()
    assert f.feed("Sure <") == "Sure "
    assert f.feed("/") == ""
    assert f.feed("h") == ""
    assert f.feed(">x") == "x"
    assert f.feed("<b>") == "<b>"


def test_add_gen_marker():
    assert add_gen_marker("draw a cat") == "draw a cat <GEN>"
    assert add_gen_marker("draw a cat <GEN>") == "draw a cat <GEN>"
    assert add_gen_marker("draw a cat \n") == "draw a cat <GEN>"
    assert add_gen_marker("") == "<GEN>"
    msgs = [Message("user", "hi"), Message("assistant", "hello"), Message("user", "draw")]
    out = add_gen_marker_to_messages(msgs)
    assert [m.content for m in out] == ["hi", "hello", "draw <GEN>"]
    assert msgs[2].content == "draw"  # the caller's list is not changed
    with pytest.raises(MinigemError, match="no user turn"):
        add_gen_marker_to_messages([Message("system", "be brief")])


# ----------------------------------------------------------------------- tiny pipelines


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    """A saved tiny pipeline directory. Read-only: copy it to break it."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def tiny_bridge(tiny_sd) -> DiffusionBridge:
    return DiffusionBridge(tiny_sd, device="cpu", steps=2, size=(32, 32))


def pixels(im: Image.Image) -> bytes:
    return im.tobytes()


# ----------------------------------------------------------------------- bridge


def test_import_and_bridge_do_not_import_diffusers(tiny_sd):
    code = ("import sys, minigem; from minigem.imagegen.bridge import DiffusionBridge; "
            "import minigem.cli, minigem.serving.imagegen, minigem.imagegen.chat; "
            f"b = DiffusionBridge({str(tiny_sd)!r}); "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'; print(b.class_name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "StableDiffusionPipeline"


def test_bridge_generates_with_seed_and_size(tiny_bridge):
    a = tiny_bridge.generate("a red circle", seed=3)
    assert len(a) == 1 and a[0].size == (32, 32) and a[0].mode == "RGB"
    assert pixels(tiny_bridge.generate("a red circle", seed=3)[0]) == pixels(a[0])  # same seed
    assert pixels(tiny_bridge.generate("a red circle", seed=4)[0]) != pixels(a[0])
    two = tiny_bridge.generate("a red circle", n=2, size=(48, 32), seed=3, steps=1, guidance=1.0,
                               negative_prompt="blurry")
    assert [im.size for im in two] == [(48, 32), (48, 32)]


def test_bridge_option_errors(tiny_bridge, tiny_sd):
    with pytest.raises(MinigemError, match="image generation failed: .*divisible by 8"):
        tiny_bridge.generate("x", size=(33, 32))
    with pytest.raises(MinigemError, match="steps: at least 1"):
        DiffusionBridge(tiny_sd, steps=0)
    with pytest.raises(MinigemError, match="n: at least 1"):
        tiny_bridge.generate("x", n=0)
    with pytest.raises(MinigemError, match="dtype: 'fp8'"):
        DiffusionBridge(tiny_sd, dtype="fp8")
    assert parse_size("64x48") == (64, 48) and parse_size("64") == (64, 64)
    with pytest.raises(MinigemError, match="not WIDTHxHEIGHT"):
        parse_size("big")


def copy_pipeline(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def test_bridge_directory_errors(tiny_sd, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ImagePipelineError, match=f"{missing}: no such text-to-image pipeline directory"):
        DiffusionBridge(missing)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImagePipelineError, match="not a directory"):
        DiffusionBridge(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImagePipelineError, match=f"{empty}: not a diffusers pipeline directory \\(no model_index.json\\)"):
        DiffusionBridge(empty)
    (empty / "model_index.json").write_text("{not json")
    with pytest.raises(ImagePipelineError, match="model_index.json: not valid JSON"):
        DiffusionBridge(empty)
    (empty / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    with pytest.raises(ImagePipelineError, match="no \"_class_name\""):
        DiffusionBridge(empty)
    broken = copy_pipeline(tiny_sd, tmp_path / "no-unet")
    import shutil

    shutil.rmtree(broken / "unet")
    with pytest.raises(ImagePipelineError, match=f"{broken}: the pipeline's 'unet' component "
                                                 "\\(UNet2DConditionModel\\) is missing"):
        DiffusionBridge(broken)


def test_bridge_load_errors(tiny_sd, tmp_path):
    corrupt = copy_pipeline(tiny_sd, tmp_path / "corrupt")
    for f in (corrupt / "unet").glob("*.safetensors"):
        f.write_bytes(b"not safetensors")
    with pytest.raises(ImagePipelineError, match=f"{corrupt}: cannot load the StableDiffusionPipeline"):
        DiffusionBridge(corrupt, device="cpu").generate("x")
    unknown = copy_pipeline(tiny_sd, tmp_path / "unknown")
    index = json.loads((unknown / "model_index.json").read_text())
    (unknown / "model_index.json").write_text(json.dumps({**index, "_class_name": "NoSuchPipeline"}))
    with pytest.raises(ImagePipelineError, match="unknown pipeline class 'NoSuchPipeline'"):
        DiffusionBridge(unknown).generate("x")


def test_bridge_custom_class_registry(tiny_sd, tmp_path, monkeypatch):
    """A _class_name that is not in diffusers loads through minigem's registry."""
    custom = copy_pipeline(tiny_sd, tmp_path / "custom")
    index = json.loads((custom / "model_index.json").read_text())
    (custom / "model_index.json").write_text(json.dumps({**index, "_class_name": "MyPipeline"}))
    monkeypatch.setitem(bridge_mod.PIPELINE_CLASSES, "MyPipeline", "diffusers:StableDiffusionPipeline")
    bridge = DiffusionBridge(custom, device="cpu", steps=1)
    assert type(bridge.load()).__name__ == "StableDiffusionPipeline"
    assert bridge.generate("x", size=(32, 32), seed=0)[0].size == (32, 32)


def test_no_bundled_pipeline(monkeypatch, tmp_path):
    monkeypatch.setattr(bridge_mod, "BUNDLED_T2I", tmp_path / "not-installed")
    with pytest.raises(ImagePipelineError, match="no text-to-image pipeline is available"):
        DiffusionBridge()


# ----------------------------------------------------------------------- chat API


@pytest.fixture
def vlm():
    from minigem.serving.testing import tiny_model

    return tiny_model()


class Spy:
    """An ImageGenerator that records what it was asked to draw."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def generate(self, prompt, n=1, size=None, seed=None):
        self.calls.append((prompt, n, size, seed))
        return [Image.new("RGB", size or (8, 8), (0, 200, 0)) for _ in range(n)]


def test_chat_result_api(vlm, tiny_bridge):
    model = scripted(vlm, ANSWER)
    asked: list = []
    chat_batch = model.chat_batch
    model.chat_batch = lambda reqs, **kw: asked.append(reqs) or chat_batch(reqs, **kw)
    out = model.chat(None, "draw a green triangle", generate_image=True, image_pipeline=tiny_bridge,
                     image_options={"seed": 1, "size": (32, 32)}, max_new_tokens=20)
    assert isinstance(out, ChatResult)
    assert (out.text, out.prompt, str(out)) == (SHOWN, PROMPT, SHOWN)
    assert len(out.images) == 1 and out.images[0].size == (32, 32)
    assert asked[0][0][1] == "draw a green triangle <GEN>"
    want = tiny_bridge.generate(PROMPT, size=(32, 32), seed=1)[0]
    assert pixels(out.images[0]) == pixels(want)
    assert model.chat(None, "draw", max_new_tokens=20) == ANSWER  # a plain str without the flag


def test_chat_result_without_span_and_conversation(vlm):
    spy = Spy()
    model = scripted(vlm, "I cannot draw.")
    msgs = [Message("user", "hi"), Message("assistant", "hello"), Message("user", "draw a star")]
    out = model.chat(None, msgs, generate_image=True, image_pipeline=spy, max_new_tokens=10)
    assert (out.text, out.prompt, out.images, spy.calls) == ("I cannot draw.", None, [], [])
    scripted(model, ANSWER)
    out = model.chat(None, msgs, generate_image=True, image_pipeline=spy,
                     image_options={"n": 2, "seed": 5}, max_new_tokens=20)
    assert spy.calls == [(PROMPT, 2, None, 5)] and len(out.images) == 2


def test_chat_bad_pipeline_fails_before_generating(vlm, tmp_path):
    with pytest.raises(ImagePipelineError, match="no such text-to-image pipeline directory"):
        vlm.chat(None, "draw", generate_image=True, image_pipeline=tmp_path / "nope")


# ----------------------------------------------------------------------- CLI


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli_model(vlm, monkeypatch):
    """`minigem chat` loads this model whatever --model says."""
    import minigem.commands

    monkeypatch.setattr(minigem.commands, "load", lambda path: vlm)
    return vlm


def test_cli_gen_json(cli_model, tiny_sd, tmp_path, capsys):
    scripted(cli_model, ANSWER)
    out_dir = tmp_path / "pics"
    code, out, err = _run(capsys, "chat", "--gen", "draw a green triangle", "--json",
                          "--image-pipeline", str(tiny_sd), "--out-dir", str(out_dir),
                          "--steps", "2", "--size", "32x32", "--guidance", "2.0", "--seed", "7",
                          "--negative-prompt", "blurry", "--max-new-tokens", "20")
    assert code == 0, err
    assert out.count("\n") == 1
    got = json.loads(out)
    assert got == {"text": SHOWN, "prompt": PROMPT, "images": [str(out_dir / "minigem-0001.png")]}
    assert Image.open(got["images"][0]).size == (32, 32)
    code, out, _ = _run(capsys, "chat", "--gen", "draw it again", "--image-pipeline", str(tiny_sd),
                        "--out-dir", str(out_dir), "--steps", "1", "--size", "32",
                        "--max-new-tokens", "20")
    assert code == 0
    assert out.splitlines() == [SHOWN, f"prompt: {PROMPT}", f"image: {out_dir / 'minigem-0002.png'}"]


def test_cli_gen_without_span(cli_model, tiny_sd, tmp_path, capsys):
    scripted(cli_model, "I only talk about shapes.")
    code, out, err = _run(capsys, "chat", "--gen", "draw", "--json", "--image-pipeline", str(tiny_sd),
                          "--out-dir", str(tmp_path / "pics"), "--max-new-tokens", "12")
    assert code == 0
    assert json.loads(out) == {"text": "I only talk about shapes.", "prompt": None, "images": []}
    assert "no image: the model wrote no <h>...</h> image prompt" in err
    assert not (tmp_path / "pics").exists() or not any((tmp_path / "pics").iterdir())


def test_cli_gen_errors(cli_model, tiny_sd, tmp_path, capsys):
    missing = tmp_path / "no-pipeline"
    code, out, err = _run(capsys, "chat", "--gen", "draw", "--image-pipeline", str(missing))
    assert code == 2 and out == ""
    assert err.strip() == f"error: {missing}: no such text-to-image pipeline directory"
    code, _, err = _run(capsys, "chat", "--gen", "draw", "--image-pipeline", str(tiny_sd),
                        "--size", "huge")
    assert code == 2 and "size: 'huge' is not WIDTHxHEIGHT" in err


def test_cli_gen_interactive(cli_model, tiny_sd, tmp_path, capsys, monkeypatch):
    scripted(cli_model, ANSWER)
    lines = iter(["draw a triangle", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, _ = _run(capsys, "chat", "--gen", "--image-pipeline", str(tiny_sd), "--out-dir",
                        str(tmp_path), "--steps", "1", "--size", "32x32", "--max-new-tokens", "20")
    assert code == 0
    assert f"minigem> {SHOWN}\nprompt: {PROMPT}\nimage: {tmp_path / 'minigem-0001.png'}\n" in out


# ----------------------------------------------------------------------- serving


@pytest.fixture
def client(vlm, tiny_bridge):
    from fastapi.testclient import TestClient

    from minigem.serving.api import create_app
    from minigem.serving.settings import ServeSettings

    app = create_app(scripted(vlm, ANSWER), ServeSettings(model_name="tiny"),
                     image_generator=tiny_bridge)
    with TestClient(app) as c:
        yield c


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


CHAT = {"messages": [{"role": "user", "content": "draw a green triangle"}], "max_tokens": 20,
        "temperature": 0, "modalities": ["text", "image"]}


def test_serving_chat_with_image(client, tiny_bridge):
    assert client.get("/health").json()["image_generation"] is True
    msg = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]
    assert msg["content"] == SHOWN
    [image] = msg["images"]
    got = decode_data_url(image["image_url"]["url"])
    assert got.size == (32, 32)
    plain = client.post("/v1/chat/completions", json={**CHAT, "modalities": None}).json()
    assert plain["choices"][0]["message"]["content"] == ANSWER  # markers only handled on request
    assert "images" not in plain["choices"][0]["message"]


def test_serving_chat_with_image_streamed(client):
    text, images = "", []
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            assert "<h" not in delta.get("content", "") and "</" not in delta.get("content", "")
            text += delta.get("content", "")
            images += delta.get("images", [])
    assert text == SHOWN and len(images) == 1


def test_serving_chat_without_span(client, vlm):
    scripted(vlm, "No picture today.")
    msg = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "No picture today.", "images": []}


def test_serving_images_endpoint(client, tiny_bridge):
    r = client.post("/v1/images/generations", json={"prompt": "a red square", "n": 2, "size": "32x32"})
    assert r.status_code == 200
    data = r.json()["data"]
    assert len(data) == 2
    assert Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))).size == (32, 32)
    r = client.post("/v1/images/generations", json={"prompt": "a red square", "size": "33x32"})
    assert r.status_code == 400 and "divisible by 8" in r.json()["error"]["message"]


def test_serve_cli_builds_the_bridge(monkeypatch, tiny_sd, tmp_path):
    import uvicorn

    from minigem.serving.testing import tiny_checkpoint

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # serve() sets it globally
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(gen=app.state.image_generator))
    assert main(["serve", "--model", str(tiny_checkpoint()), "--image-pipeline", str(tiny_sd),
                 "--threads", "1"]) == 0
    assert isinstance(seen["gen"], DiffusionBridge) and seen["gen"].path == tiny_sd
    monkeypatch.setattr(bridge_mod, "BUNDLED_T2I", tmp_path / "none")
    assert main(["serve", "--model", str(tiny_checkpoint()), "--threads", "1"]) == 0
    assert seen["gen"] is None
    assert main(["serve", "--model", str(tiny_checkpoint()), "--image-pipeline", str(tmp_path / "x"),
                 "--threads", "1"]) == 2


# ----------------------------------------------------------------------- demo


def test_demo_generation(vlm, tiny_sd, tmp_path, monkeypatch, capsys):
    from minigem.imagegen.command import demo_generation

    monkeypatch.setattr(bridge_mod, "BUNDLED_T2I", tmp_path / "none")
    demo_generation(vlm, str(tmp_path / "pics"))
    assert capsys.readouterr().out.strip() == (
        "(image generation skipped: the bundled text-to-image pipeline is not installed)")
    monkeypatch.setattr(bridge_mod, "BUNDLED_T2I", tiny_sd)
    demo_generation(scripted(vlm, ANSWER), str(tmp_path / "pics"))
    out = capsys.readouterr().out
    assert f"A: {SHOWN}\n  prompt: {PROMPT}\n  image: {tmp_path / 'pics' / 'minigem-0001.png'}" in out
    assert (tmp_path / "pics" / "minigem-0001.png").is_file()
