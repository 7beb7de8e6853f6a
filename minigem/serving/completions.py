"""``POST /v1/chat/completions``: one JSON answer, or SSE chunks ending in ``data: [DONE]``.

The request is validated and encoded in a thread (images are decoded there), queued in the
engine, and answered from the job's event queue. A client that goes away cancels its job:
the stream's generator is closed (``finally``), and a waiting non-streamed request polls
``request.is_disconnected()``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from minigem.errors import MinigemError
from minigem.imagegen.markers import MarkerFilter, extract_prompt, strip_markers
from minigem.serving.chat import Prepared, check_model, prepare
from minigem.serving.engine import Delta, Done, Event, Failed, Job, QueueFull
from minigem.serving.errors import APIError
from minigem.serving.imagegen import png_base64, unavailable
from minigem.serving.schemas import ChatCompletionRequest

POLL_S = 0.25  # how often a waiting request checks that its client is still there


async def chat_completions(request: Request, body: ChatCompletionRequest):
    arrived = time.monotonic()
    app = request.app
    settings, engine, model = app.state.settings, app.state.engine, app.state.model
    check_model(body.model, settings.model_name)
    want_image = bool(body.modalities and "image" in body.modalities)
    if want_image and app.state.image_generator is None:
        raise unavailable("modalities")
    if engine.queued >= engine.max_queue:
        raise _busy429(engine, settings)
    engine.expect()  # an idle engine may wait for this one to prefill it with others
    try:
        prepared: Prepared = await run_in_threadpool(prepare, model, settings, body)
    except BaseException:  # a 4xx, or the client went away
        engine.withdraw()
        raise
    job = Job(prepared.prompt_ids, prepared.pixel_values, prepared.pixel_values_aux, prepared.gen,
              timeout_s=settings.timeout_s, loop=asyncio.get_running_loop(), stream=body.stream,
              created=arrived)
    try:
        engine.submit(job, expected=True)
    except QueueFull:
        raise _busy429(engine, settings) from None
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": settings.model_name}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(job, meta, usage, want_image, request),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, done = "", None
    async for ev in _events(job, request):
        if isinstance(ev, Failed):
            raise APIError(ev.status, ev.message, code="timeout" if ev.status == 408 else None)
        if isinstance(ev, Done):
            text, done = ev.text, ev
    if done is None:  # the client went away: nobody reads this
        return JSONResponse({}, status_code=499)
    message: dict = {"role": "assistant", "content": text}
    if want_image:  # the answer's <h>...</h> prompt is drawn; the user sees no markers
        message["content"] = strip_markers(text)
        message["images"] = await _images(app, text)
    return {**meta, "object": "chat.completion", "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "finish_reason": done.finish_reason,
                         "logprobs": None}],
            "usage": _usage(done)}


def _busy429(engine, settings) -> APIError:
    return APIError(429, f"the server is busy ({engine.queued} requests waiting); retry later",
                    code="queue_full", headers={"Retry-After": str(settings.retry_after_s)})


def _usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def _images(app, answer: str) -> list[dict]:
    """The picture for the answer's last ``<h>...</h>`` span (none without one)."""
    prompt = extract_prompt(answer)
    if prompt is None:
        return []
    images = await run_in_threadpool(app.state.image_generator.generate, prompt, 1)
    return [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_base64(im)}}
            for im in images]


async def _events(job: Job, request: Request) -> AsyncIterator[Event]:
    """The job's events until Done/Failed; cancels the job if the client goes away first."""
    finished = False
    checked = time.monotonic()
    try:
        while True:
            try:
                ev = await asyncio.wait_for(job.events.get(), POLL_S)
            except asyncio.TimeoutError:
                ev = None
            if time.monotonic() - checked >= POLL_S:
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
            if ev is None:
                continue
            finished = isinstance(ev, Done | Failed)
            yield ev
            if finished:
                return
    finally:
        if not finished:
            job.cancel()


def _chunk(meta: dict, delta: dict, finish: str | None = None, usage: bool = False) -> str:
    body = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if usage:
        body["usage"] = None
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(job: Job, meta: dict, usage: bool, want_image: bool,
               request: Request) -> AsyncIterator[str]:
    events = _events(job, request)
    markers = MarkerFilter() if want_image else None  # hides <h>, </h> split across deltas
    try:
        yield _chunk(meta, {"role": "assistant", "content": ""}, usage=usage)
        async for ev in events:
            if isinstance(ev, Delta):
                text = markers.feed(ev.text) if markers else ev.text
                if text:
                    yield _chunk(meta, {"content": text}, usage=usage)
            elif isinstance(ev, Failed):
                err = APIError(ev.status, ev.message, code="timeout" if ev.status == 408 else None)
                yield f"data: {json.dumps(err.body())}\n\n"
            else:
                if markers is not None:
                    rest = markers.flush().rstrip()
                    if rest:
                        yield _chunk(meta, {"content": rest}, usage=usage)
                    try:
                        images = await _images(request.app, ev.text)
                    except MinigemError as err:  # e.g. a size the pipeline refuses
                        images = []
                        yield f"data: {json.dumps(APIError(400, str(err)).body())}\n\n"
                    yield _chunk(meta, {"images": images}, usage=usage)
                yield _chunk(meta, {}, ev.finish_reason, usage=usage)
                if usage:
                    tail = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
                            "choices": [], "usage": _usage(ev)}
                    yield f"data: {json.dumps(tail)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()
