"""Seeing what was mined (`minigem.explain`, `minigem explain`, `POST /v1/explain`) on tiny
random Mini-Gemini models: 3x3 LR tokens with M = 4 (HR 48), and HD 5 x 2x2 tokens (HR 64)."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from conftest import build_tiny_model, mgm_config
from PIL import Image

from minigem.explain import ExplainError, Explanation, explain, render
from minigem.vision.base import VisionFeatures

QUESTION = "What color is the circle?"
GEN = {"max_new_tokens": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def mgm(tiny_tokenizer):
    return build_tiny_model(mgm_config(), tiny_tokenizer)


@pytest.fixture
def mgm_hd(tiny_tokenizer):
    return build_tiny_model(mgm_config(hd=True), tiny_tokenizer)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    img = Image.new("RGB", (60, 40), (30, 30, 200))  # not square: padded like the model does
    for x in range(10, 30):
        for y in range(5, 25):
            img.putpixel((x, y), (230, 40, 40))
    return img


def _block_mask(ex: Explanation, token: int) -> torch.Tensor:
    s, m = ex.side, ex.m
    mask = torch.zeros(s * m, s * m, dtype=torch.bool)
    r, c = divmod(token, s)
    mask[r * m : (r + 1) * m, c * m : (c + 1) * m] = True
    return mask


# ----------------------------------------------------------------------------- explain


def test_maps_are_restricted_to_each_tokens_sub_region(mgm, image) -> None:
    ex = explain(mgm, image, QUESTION, **GEN)
    assert ex.answer == mgm.chat(image, QUESTION, **GEN)  # same answer as chat
    assert ex.mining.shape == (1, 9, 4, 4) and (ex.side, ex.m, ex.map_side) == (3, 4, 12)
    assert ex.view_names == ["image"] and ex.hr_image.size == (48, 48) and ex.cell_px == 4
    assert ex.heatmap.shape == (12, 12)
    total = torch.zeros(12, 12)
    for t in range(9):
        tmap = ex.token_map(0, t)
        inside = _block_mask(ex, t)
        assert tmap.shape == (12, 12)
        torch.testing.assert_close(tmap[inside].sum(), torch.tensor(1.0))
        assert (tmap[~inside] == 0).all() and (tmap[inside] > 0).all()
        total += tmap
    torch.testing.assert_close(ex.heatmap, total)  # the assembled map is the tokens' blocks
    # the same maps as the connector computes on the towers' features
    pix = mgm.processor([image])
    with torch.no_grad():
        feats = VisionFeatures(mgm.vision_tower(pix["pixel_values"]),
                               mgm.vision_tower_aux(pix["pixel_values_aux"]))
        ref = mgm.connector.mining_attention(feats)
    torch.testing.assert_close(ex.mining.flatten(2), ref)
    # relevance: shares of the answer's attention to the 9 visual tokens
    assert ex.relevance.shape == (1, 9) and (ex.relevance >= 0).all()
    torch.testing.assert_close(ex.relevance.sum(), torch.tensor(1.0))
    assert 0 < ex.visual_attention <= 1 and len(ex.answer_ids) >= 1
    assert mgm.language_model.config._attn_implementation == "sdpa"  # switched back


def test_relevance_equals_hf_output_attentions(mgm, image) -> None:
    """The per-layer hook reduction equals HF's own output_attentions (eager), averaged."""
    ex = explain(mgm, image, QUESTION, **GEN)
    prompt = mgm.encode_prompt(mgm.user_messages(QUESTION, 1), 1)
    answer_ids = ex.answer_ids
    ids = torch.tensor([prompt + answer_ids])
    pix = mgm.processor([image])
    lm = mgm.language_model
    lm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            embeds = mgm.embed(ids, pix["pixel_values"], pix["pixel_values_aux"])
            out = lm(inputs_embeds=embeds, output_attentions=True)
    finally:
        lm.set_attn_implementation("sdpa")
    p, a = len(prompt), len(answer_ids)
    att = torch.stack(out.attentions)[:, 0, :, p - 1 : p - 1 + a]  # [L, H, A, S]
    vis = (ids[0] == mgm.image_token_id).nonzero().squeeze(-1)
    on_vis = att.mean((0, 1))[:, vis]  # [A, T]
    rel = on_vis.mean(0)
    torch.testing.assert_close(ex.relevance.flatten(), rel / rel.sum(), atol=1e-5, rtol=1e-4)
    assert ex.visual_attention == pytest.approx(float(on_vis.sum(-1).mean()), rel=1e-4)
    top = ex.top_tokens(3)
    assert [t["rank"] for t in top] == [1, 2, 3]
    assert top[0]["token"] == int(rel.argmax()) and top[0]["score"] >= top[1]["score"] >= top[2]["score"]


def test_hd_five_views(mgm_hd, image) -> None:
    ex = explain(mgm_hd, image, QUESTION, **GEN)
    assert ex.view_names == ["global", "crop(0,0)", "crop(0,1)", "crop(1,0)", "crop(1,1)"]
    assert ex.mining.shape == (5, 4, 4, 4) and ex.relevance.shape == (5, 4)
    torch.testing.assert_close(ex.relevance.sum(), torch.tensor(1.0))
    assert ex.map_side == 16 and ex.heatmap.shape == (16, 16) and ex.hr_size == 64
    torch.testing.assert_close(ex.mining.flatten(2).sum(-1), torch.ones(5, 4))
    # crops tile the full-resolution map in place; the global view is its own (coarser) map
    torch.testing.assert_close(ex.heatmap[:8, 8:], ex.view_heatmap(2))
    torch.testing.assert_close(ex.heatmap[8:, :8], ex.view_heatmap(3))
    assert ex.token_box(2, 1) == (12, 0, 16, 4)  # crop(0,1), token (0, 1)
    assert ex.token_box(0, 3) == (8, 8, 16, 16)  # global token (1, 1): 2M x 2M cells
    assert ex.token_box_px(4, 3) == (48, 48, 64, 64)
    for t in ex.top_tokens(20):
        x0, y0, x1, y1 = t["box"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert x0 <= t["peak"][0] < x1 and y0 <= t["peak"][1] < y1
    picture = render(ex, top_k=20, scale=1)
    assert picture.width == 64


def test_render_draws_over_the_hr_image(mgm, image, tmp_path) -> None:
    ex = explain(mgm, image, QUESTION, **GEN)
    picture = render(ex, top_k=2, scale=1)
    assert picture.width == ex.hr_size == 48 and picture.height > 48  # caption band below
    path = tmp_path / "heat.png"
    picture.save(path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width == 48
    assert picture.crop((0, 0, 48, 48)).tobytes() != ex.hr_image.tobytes()  # overlaid
    big = render(ex)  # small HR images are enlarged so the caption is legible
    assert big.width == 48 * 8


def test_non_mgm_model_is_a_clear_error(tiny_model, image) -> None:
    with pytest.raises(ExplainError) as err:
        explain(tiny_model, image, QUESTION, name="runs/llava", **GEN)
    assert str(err.value) == ("explain needs a Mini-Gemini model with a patch_mining connector; "
                              "runs/llava has mlp2x_gelu")


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def mgm_dir(mgm, tmp_path):
    from minigem.checkpoints.native import save_model

    return save_model(mgm, tmp_path / "mgm")


@pytest.fixture
def image_file(image, tmp_path):
    path = tmp_path / "img.png"
    image.save(path)
    return path


def test_cli_json(mgm_dir, image_file, tmp_path, capsys) -> None:
    from minigem.cli import main

    out = tmp_path / "heat.png"
    rc = main(["explain", "--model", str(mgm_dir), "--image", str(image_file), QUESTION,
               "--out", str(out), "--json", "--top-k", "3", "--max-new-tokens", "4"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert info["out"] == str(out) and isinstance(info["answer"], str)
    assert info["hr_size"] == 48 and info["lr_grid"] == 3 and info["cells_per_token"] == 4
    assert [t["rank"] for t in info["top_tokens"]] == [1, 2, 3]
    for t in info["top_tokens"]:
        assert t["view"] == "image" and 0 <= t["row"] < 3 and 0 <= t["col"] < 3
        assert t["box"] == [t["col"] * 16, t["row"] * 16, t["col"] * 16 + 16, t["row"] * 16 + 16]
        assert 0 < t["score"] <= 1
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width % 48 == 0


def test_cli_user_mistakes(tiny_saved_model, mgm_dir, image_file, tmp_path, capsys) -> None:
    from minigem.cli import main

    out = str(tmp_path / "x.png")
    rc = main(["explain", "--model", str(tiny_saved_model), "--image", str(image_file), "q", "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip() == ("error: explain needs a Mini-Gemini model with a patch_mining connector; "
                           f"{tiny_saved_model} has mlp2x_gelu")
    rc = main(["explain", "--model", str(mgm_dir), "--image", str(tmp_path / "nope.png"), "q", "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and "image file not found" in err and "Traceback" not in err
    rc = main(["explain", "--model", str(mgm_dir), "--image", str(image_file), "q",
               "--out", str(tmp_path / "no" / "dir.png")])
    assert rc == 2 and "no such directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- serving


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _client(model):
    from fastapi.testclient import TestClient

    from minigem.serving.api import create_app
    from minigem.serving.settings import ServeSettings

    return TestClient(create_app(model, ServeSettings(model_name="tiny", max_tokens_limit=16)))


def test_serving_explain(mgm, image) -> None:
    with _client(mgm) as c:
        assert c.get("/health").json()["mining"] is True
        r = c.post("/v1/explain", json={"image_url": {"url": _data_url(image)}, "question": QUESTION,
                                        "max_tokens": 4, "top_tokens": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "explanation" and body["model"] == "tiny"
        assert body["answer"] == mgm.chat(image, QUESTION, **GEN)
        assert body["views"] == ["image"] and body["hr_size"] == 48 and len(body["top_tokens"]) == 2
        head, _, payload = body["heatmap"].partition(",")
        assert head == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(payload))) as im:
            assert im.format == "PNG" and im.width % 48 == 0
        # the bare-string image form, and the usual errors
        r = c.post("/v1/explain", json={"image_url": _data_url(image), "question": "q", "max_tokens": 2})
        assert r.status_code == 200
        r = c.post("/v1/explain", json={"image_url": "file:///etc/passwd", "question": "q"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image_url"
        r = c.post("/v1/explain", json={"image_url": _data_url(image), "question": "q", "max_tokens": 99})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = c.post("/v1/explain", json={"image_url": _data_url(image), "question": "q", "model": "gpt"})
        assert r.status_code == 404
        # chat still works after an explanation (the attention kind was switched back)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200


def test_serving_explain_needs_mgm(tiny_model, image) -> None:
    with _client(tiny_model) as c:
        assert c.get("/health").json()["mining"] is False
        r = c.post("/v1/explain", json={"image_url": _data_url(image), "question": "q"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "explain_unavailable" and err["type"] == "invalid_request_error"
        assert err["message"] == ("explain needs a Mini-Gemini model with a patch_mining connector; "
                                  "this server's model has mlp2x_gelu")
        # the web UI's toggle starts hidden and is shown from /health's "mining"
        assert 'id="mining-label" hidden' in c.get("/").text
        js = c.get("/static/app.js").text
        assert '"/v1/explain"' in js and "h.mining" in js
        assert "/v1/explain" in c.get("/openapi.json").json()["paths"]
