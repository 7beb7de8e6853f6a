"""Under load, against a live server: 64 concurrent mixed requests all succeed (batched), a
full queue answers 429 with Retry-After, a client that goes away cancels its work, and a
request over its time limit answers 408."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from minigem.serving.api import create_app
from minigem.serving.settings import ServeSettings
from minigem.serving.testing import LiveServer, png_data_url

pytestmark = pytest.mark.usefixtures("one_thread")


def serve(model, **kw):
    return LiveServer(create_app(model, ServeSettings(model_name="tiny", **kw)))


@contextlib.contextmanager
def slowed(model, seconds: float = 0.005):
    """Every LM forward takes at least `seconds`: long requests stay running long enough."""
    hook = model.language_model.register_forward_pre_hook(lambda *_: time.sleep(seconds))
    try:
        yield model
    finally:
        hook.remove()


def wait_for(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_64_concurrent_mixed_requests(model):
    rng = random.Random(0)
    images = [png_data_url((rng.randrange(256), 90, 200), (16 + 8 * k, 24)) for k in range(4)]

    async def one(client: openai.AsyncOpenAI, k: int) -> tuple[int, int, str | None]:
        n_tokens = rng.choice([1, 4, 16, 40])
        content: list[dict] = [{"type": "image_url", "image_url": {"url": u}}
                               for u in images[: k % 3]]
        content.append({"type": "text", "text": " ".join(["Describe the image."] * (1 + k % 5))})
        kw = dict(model="tiny", messages=[{"role": "user", "content": content}],
                  max_tokens=n_tokens, temperature=(k % 2) * 0.8, seed=k)
        if k % 4 == 0:
            stream = await client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kw)
            chunks = [c async for c in stream]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            return n_tokens, chunks[-1].usage.completion_tokens, finish
        r = await client.chat.completions.create(**kw)
        return n_tokens, r.usage.completion_tokens, r.choices[0].finish_reason

    async def main(url: str) -> list[tuple[int, int, str | None]]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                      timeout=300) as client:
            return await asyncio.gather(*(one(client, k) for k in range(64)))

    with serve(model, max_batch=8, max_queue=64) as srv:
        results = asyncio.run(main(srv.url))
        engine = srv.app.state.engine
        assert engine.stats["completed"] == 64 and engine.stats["failed"] == 0
        assert engine.stats["peak_batch"] == 8  # requests really were decoded together
    # sampled rows may draw the end-of-sequence token: those stop early ("stop")
    assert all(got == asked if finish == "length" else got < asked for asked, got, finish in results)
    assert sum(finish == "length" for _, _, finish in results) > 48


def _stream(url: str, max_tokens: int) -> tuple[httpx.Client, httpx.Response, Iterator[str]]:
    """A running streamed request (keep the line iterator: closing it closes the connection)."""
    client = httpx.Client(timeout=60)
    body = {"messages": [{"role": "user", "content": "Describe the image."}],
            "max_tokens": max_tokens, "stream": True, "temperature": 0}
    req = client.build_request("POST", url + "/v1/chat/completions", json=body)
    resp = client.send(req, stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    assert next(lines).startswith("data: ")  # the role chunk: the request is running
    next(lines)
    return client, resp, lines


def test_full_queue_answers_429_and_disconnect_cancels(model):
    with slowed(model), serve(model, max_batch=1, max_queue=1, max_tokens_limit=500,
                              retry_after_s=3) as srv:
        engine = srv.app.state.engine
        running, resp, lines = _stream(srv.url, 480)
        assert wait_for(lambda: engine.running == 1)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}

        async def queued_then_full() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                first = asyncio.create_task(c.post("/v1/chat/completions", json=body))
                while engine.queued < 1:
                    await asyncio.sleep(0.01)
                second = await c.post("/v1/chat/completions", json=body)
                lines.close()  # the streaming client goes away: its row is cancelled
                resp.close()
                running.close()
                return await first, second

        ok, full = asyncio.run(queued_then_full())
        assert full.status_code == 429 and full.headers["retry-after"] == "3"
        assert full.json()["error"]["type"] == "rate_limit_error"
        assert ok.status_code == 200  # it ran once the cancelled stream left the batch
        assert wait_for(lambda: engine.stats["cancelled"] == 1 and engine.running == 0)
        assert engine.stats["completed"] == 1
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        again = client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=2,
                                               temperature=0)
        assert again.choices[0].finish_reason == "length"


def test_waiting_client_that_leaves_cancels(model):
    with slowed(model), serve(model, max_batch=2, max_tokens_limit=500) as srv:
        engine = srv.app.state.engine
        body = {"messages": [{"role": "user", "content": "Describe the image."}], "max_tokens": 480,
                "temperature": 0}  # greedy: never ends early
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
        assert wait_for(lambda: engine.stats["cancelled"] == 1 and engine.running == 0)
        assert engine.stats["completed"] == 0


def test_request_timeout_answers_408(model):
    with slowed(model), serve(model, timeout_s=0.05, max_tokens_limit=500) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError, match="timed out") as info:
            client.chat.completions.create(model="tiny", max_tokens=480, temperature=0,
                                           messages=[{"role": "user", "content": "Describe the image."}])
        assert info.value.status_code == 408 and info.value.body["code"] == "timeout"
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_burst_is_prepared_off_the_loop_and_prefilled_in_one_forward(model, monkeypatch):
    """Requests that arrive together are prepared (images decoded, prompt tokenized) in worker
    threads, not on the event loop; the engine waits for the announced ones and prefills them
    in one forward, with the same greedy answers as one at a time. Failed requests leave no
    announcement behind."""
    import threading

    from minigem.serving import completions

    n = 4
    arrived = threading.Barrier(n, timeout=30)  # all n are being prepared at the same time
    threads: list[threading.Thread] = []
    prepare = completions.prepare

    def held(*args):
        threads.append(threading.current_thread())
        if arrived is not None:
            arrived.wait()
        return prepare(*args)

    monkeypatch.setattr(completions, "prepare", held)
    bodies = [{"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url((60 * k, 90, 200), (16 + 8 * k, 24))}},
        {"type": "text", "text": "Describe the image." if k % 2 else "What color is the circle?"}]}],
        "max_tokens": 6, "temperature": 0} for k in range(n)]

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))

    with serve(model, max_batch=8, gather_ms=60_000) as srv:
        engine = srv.app.state.engine
        together = asyncio.run(burst(srv.url))
        assert engine.stats["prefills"] == 1 and engine.stats["prefill_rows"] == n
        arrived = None
        alone = [httpx.post(srv.url + "/v1/chat/completions", json=b, timeout=120) for b in bodies]
        assert engine.stats["prefills"] == 1 + n
        bad = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
        assert bad.status_code == 400 and engine.expected == 0
    assert srv.thread not in threads and len(threads) == 2 * n + 1
    answers = [r.json()["choices"][0]["message"]["content"] for r in together]
    assert [r.status_code for r in together] == [200] * n
    assert answers == [r.json()["choices"][0]["message"]["content"] for r in alone]
    assert [r.json()["usage"] for r in together] == [r.json()["usage"] for r in alone]
