"""The OpenAI-compatible API through the official `openai` client against a live server:
models, completions (plain, streamed with usage, with images), and every error class."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from minigem.serving.api import create_app
from minigem.serving.settings import ServeSettings
from minigem.serving.testing import LiveServer, png_data_url

LIMITS = dict(model_name="tiny", max_images=2, max_image_pixels=128 * 128, max_tokens_limit=64,
              max_body_bytes=200_000)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(model):
    with LiveServer(create_app(model, ServeSettings(**LIMITS))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def user(*parts) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": p}} if p.startswith("data:")
               else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


def test_completion_counts_tokens(client, model):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Describe the image."}],
                                       max_tokens=7, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and choice.message.content
    prompt = model.encode_prompt(model.user_messages("Describe the image.", 0), 0)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 7)
    assert r.usage.total_tokens == len(prompt) + 7


def test_stream_with_usage_matches_plain(client):
    msgs = user("What color is the circle?")
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_raw_sse_ends_with_done(server):
    body = {"messages": user("hi"), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_images_are_seen(client, model):
    red, blue = png_data_url((220, 20, 20)), png_data_url((20, 20, 220), (40, 20))
    msgs = user(red, blue, "What color is the circle?")
    msgs[0]["content"][1]["image_url"] = blue  # a bare string URL is accepted too
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    images = [Image.open(io.BytesIO(base64.b64decode(u.split(",")[1]))) for u in (red, blue)]
    assert r.choices[0].message.content == model.chat(images, "What color is the circle?",
                                                      max_new_tokens=10)
    prompt = model.encode_prompt(model.user_messages("What color is the circle?", 2), 2)
    assert r.usage.prompt_tokens == len(prompt)
    assert prompt.count(model.image_token_id) == 2 * model.tokens_per_image


def test_seed_and_stop(client):
    kw = dict(model="tiny", messages=user("Describe the image."), max_tokens=16, temperature=1.0)
    a, b = (client.chat.completions.create(seed=7, **kw).choices[0].message.content for _ in "ab")
    assert a == b
    full = client.chat.completions.create(**{**kw, "temperature": 0}).choices[0].message.content
    stop = full[5:7]
    cut = client.chat.completions.create(**{**kw, "temperature": 0}, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[: full.index(stop)]


def truncated_png() -> str:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()[:-400]).decode()


BAD_REQUESTS = [
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": []}, "at least 1 item"),
    ({"messages": user("data:image/png;base64,@@notbase64@@")}, "broken base64"),
    ({"messages": user("data:image/png;base64," + base64.b64encode(b"hello world").decode())},
     "not an image"),
    ({"messages": user(truncated_png())}, "truncated or corrupt"),
    ({"messages": user("data:text/plain;base64,aGk=")}, "not an image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "file:///etc/passwd"}]}]},
     "unsupported image URL"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "/etc/passwd"}]}]},
     "unsupported image URL"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "http://example.com/a.png"}]}]},
     "remote image URLs are disabled"),
    ({"messages": user(*[png_data_url()] * 3, "hi")}, "3 images, over the limit of 2"),
    ({"messages": user("hi"), "temperature": "hot"}, "temperature"),
    ({"messages": user("hi"), "max_tokens": 65}, "over this server's limit of 64"),
    ({"messages": user("hi"), "max_tokens": 0}, "max_tokens"),
    ({"messages": user("hi"), "n": 2}, "n:"),
    ({"messages": user("hi"), "top_p": 1.5}, "top_p"),
    ({"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings"),
    ({"messages": user("hi"), "tools": []}, "Extra inputs are not permitted"),
    ({"messages": [{"role": "user", "content": "<image> hi"}]}, "must not contain the image placeholder"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "starting with user"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]}, "messages.0.content"),
    ({"messages": user("word " * 3000)}, "the prompt is too long"),
    ({"messages": user("hi"), "modalities": ["text", "image"]}, "image generation is not available"),
]


@pytest.mark.parametrize("body,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_requests_answer_400(client, server, body, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"model": "tiny", **body})
    err = info.value.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert message in err["message"] and "Traceback" not in info.value.response.text
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_too_large(client, server):
    big = png_data_url(size=(200, 100))  # 20,000 pixels > 128 * 128
    with pytest.raises(openai.APIStatusError, match="over the limit of 16384") as info:
        client.chat.completions.create(model="tiny", messages=user(big, "hi"))
    assert info.value.status_code == 413
    r = httpx.post(server.url + "/v1/chat/completions", content=b"x" * 300_000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_other_errors_and_schema(client, server):
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' does not exist"):
        client.chat.completions.create(model="gpt-4", messages=user("hi"))
    with pytest.raises(openai.BadRequestError, match="image generation is not available for this model"):
        client.images.generate(prompt="a red square", model="tiny")
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/models", "/v1/images/generations", "/health"} <= set(schema["paths"])
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "minigem" in page.text


def test_api_key(model, monkeypatch):
    app = create_app(model, ServeSettings(model_name="tiny", api_key="s3cret"))
    with LiveServer(app) as srv:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.get(srv.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            bad.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2).choices
        assert httpx.get(srv.url + "/health").json()["auth_required"] is True
