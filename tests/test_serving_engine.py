"""Continuous batching: DecodeBatch equals generate(); the engine's queue, cancellation,
timeouts, streaming hold-back, and a worker that survives a failing request."""

from __future__ import annotations

import asyncio
import time

import pytest
from PIL import Image

from minigem.generation.batch import DecodeBatch, Row
from minigem.generation.decode import Generation, GenerationConfig, generate
from minigem.serving.engine import Delta, Done, Engine, Event, Failed, Job, QueueFull

QUESTIONS = ["What color is the circle?", "Describe the image.", "How many squares are there? one two"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts(model):
    ids = [model.encode_prompt(model.user_messages(q, 1), 1) for q in QUESTIONS]
    images = [Image.new("RGB", (20 + 10 * i, 30), (60 * i, 120, 40)) for i in range(3)]
    return ids, model.processor(images)["pixel_values"]


@pytest.mark.filterwarnings("error::FutureWarning")  # the KV cache under the name transformers uses
def test_rows_joining_and_leaving_match_generate(model, prompts):
    ids, pix = prompts
    gen = GenerationConfig(max_new_tokens=24, stop=("</s>",))
    ref = [generate(model, [p], pix[i : i + 1], None, gen)[0] for i, p in enumerate(ids)]
    batch = DecodeBatch(model)
    rows = [Row(gen=GenerationConfig(max_new_tokens=n, stop=("</s>",)), tag=i)
            for i, n in enumerate([24, 6, 24])]
    batch.add(ids[:1], pix[:1], None, rows[:1])
    for _ in range(4):  # row 0 runs ahead; rows 1-2 join with a longer prompt
        batch.step()
    batch.add(ids[1:], pix[1:], None, rows[1:])
    finished = []
    while len(batch):
        finished += [r.tag for r in batch.step()]
    assert finished == [1, 0, 2]  # the short row leaves first, the late one last
    for row in rows:
        n = row.gen.max_new_tokens
        assert row.out.token_ids == ref[row.tag].token_ids[:n]
        assert row.out.finish_reason == "length" and row.out.prompt_tokens == len(ids[row.tag])


def test_seeded_sampling_ignores_neighbours(model, prompts):
    ids, pix = prompts

    def sampled(with_neighbours: bool) -> list[int]:
        batch = DecodeBatch(model)
        row = Row(gen=GenerationConfig(max_new_tokens=12, temperature=1.0, seed=3))
        others = [Row(gen=GenerationConfig(max_new_tokens=12, temperature=0.7)) for _ in range(2)]
        if with_neighbours:
            batch.add(ids, pix, None, [others[0], row, others[1]])
        else:
            batch.add(ids[1:2], pix[1:2], None, [row])
        while len(batch):
            batch.step()
        return row.out.token_ids

    assert sampled(True) == sampled(False)


def test_callback_cancels_a_row(model, prompts):
    ids, pix = prompts
    batch = DecodeBatch(model)
    rows = [Row(gen=GenerationConfig(max_new_tokens=20), on_token=lambda g: len(g.token_ids) < 3),
            Row(gen=GenerationConfig(max_new_tokens=20))]
    batch.add(ids[:2], pix[:2], None, rows)
    while len(batch):
        batch.step()
    assert rows[0].out.finish_reason == "cancelled" and len(rows[0].out.token_ids) == 3
    assert len(rows[1].out.token_ids) == 20


def _collect(job: Job) -> list:
    sent = []
    job.emit = sent.append  # type: ignore[method-assign]
    return sent


def test_stream_holds_back_stop_prefixes_and_partial_characters():
    job = Job([1], None, None, GenerationConfig(stop=("STOP",)), 10, loop=None)  # type: ignore[arg-type]
    sent = _collect(job)
    for text in ["ab", "abS", "abST", "abSTX", "abSTX\ufffd", "abSTXé"]:
        job.stable_text(Generation(text=text), final=False)
    assert [e.text for e in sent] == ["ab", "STX", "é"]
    job.stable_text(Generation(text="abSTXéST"), final=True)
    assert sent[-1].text == "ST"
    sent.clear()
    job._sent = ""
    for text in [" ", " hi ", " hi there", " hi there \n"]:  # answers are stripped
        job.stable_text(Generation(text=text), final=False)
    job.stable_text(Generation(text=" hi there \n"), final=True)
    assert [e.text for e in sent] == ["hi", " there"]


async def _run(engine: Engine, job_kw: dict, n: int = 1, timeout: float = 60) -> list[list]:
    loop = asyncio.get_running_loop()
    jobs = [Job(loop=loop, **job_kw) for _ in range(n)]
    for j in jobs:
        engine.submit(j)

    async def drain(job: Job) -> list:
        events = []
        while not events or isinstance(events[-1], Delta):
            events.append(await asyncio.wait_for(job.events.get(), timeout))
        return events

    return await asyncio.gather(*(drain(j) for j in jobs))


def test_engine_batches_and_streams(model, prompts):
    ids, _ = prompts
    engine = Engine(model, max_batch=4, max_queue=16).start()
    try:
        kw = dict(prompt_ids=ids[1][-10:], pixel_values=None, pixel_values_aux=None,
                  gen=GenerationConfig(max_new_tokens=8), timeout_s=60)
        results = asyncio.run(_run(engine, kw, n=6))
    finally:
        engine.stop()
    for events in results:
        done = events[-1]
        assert isinstance(done, Done) and done.completion_tokens == 8
        assert "".join(e.text for e in events[:-1]) == done.text
    assert engine.stats["peak_batch"] > 1 and engine.stats["completed"] == 6


def test_queue_limit():
    engine = Engine(model=None, max_batch=1, max_queue=2)  # not started: nothing drains
    job = dict(prompt_ids=[1], pixel_values=None, pixel_values_aux=None, gen=GenerationConfig(),
               timeout_s=1, loop=None)
    engine.submit(Job(**job))
    engine.submit(Job(**job))
    with pytest.raises(QueueFull):
        engine.submit(Job(**job))
    assert engine.queued == 2 and engine.stats["rejected"] == 1


def test_timeout_cancel_and_survival(model, prompts):
    ids, _ = prompts
    engine = Engine(model, max_batch=2, max_queue=8).start()
    base = dict(prompt_ids=ids[1][-10:], pixel_values=None, pixel_values_aux=None,
                gen=GenerationConfig(max_new_tokens=400))
    try:
        [[*_, timed_out]] = asyncio.run(_run(engine, {**base, "timeout_s": 0.05}))
        assert isinstance(timed_out, Failed) and timed_out.status == 408
        # image tokens without pixels: the prefill raises; the job fails, the worker lives on
        bad = {**base, "prompt_ids": [model.image_token_id] * 4, "timeout_s": 30}
        [[failed]] = asyncio.run(_run(engine, bad))
        assert isinstance(failed, Failed) and failed.status == 500

        async def cancel_midway() -> None:
            job = Job(loop=asyncio.get_running_loop(), timeout_s=60, **base)
            engine.submit(job)
            assert isinstance(await asyncio.wait_for(job.events.get(), 30), Delta)
            job.cancel()

        asyncio.run(cancel_midway())
        deadline = time.monotonic() + 10
        while engine.stats["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.stats["cancelled"] == 1
        ok = {**base, "gen": GenerationConfig(max_new_tokens=3), "timeout_s": 30}
        [[*_, done]] = asyncio.run(_run(engine, ok))
        assert isinstance(done, Done) and done.completion_tokens == 3
    finally:
        engine.stop()


def _job(loop, ids, pix, n: int = 6, stream: bool = False) -> Job:
    return Job(ids, pix, None, GenerationConfig(max_new_tokens=n, stop=("</s>",)), timeout_s=60,
               loop=loop, stream=stream)


def test_announced_requests_are_prefilled_together_and_match_one_at_a_time(model, prompts):
    """Requests announced with ``expect`` are gathered into one prefill forward (the first
    one waits for the others) and give the same greedy answers as one-at-a-time decoding."""
    ids, pix = prompts
    gen = GenerationConfig(max_new_tokens=6, stop=("</s>",))
    ref = [generate(model, [p], pix[i : i + 1], None, gen)[0] for i, p in enumerate(ids)]
    engine = Engine(model, max_batch=8, gather_ms=60_000).start()

    async def staggered() -> list:
        loop = asyncio.get_running_loop()
        for _ in ids:
            engine.expect()
        jobs = []
        for i, p in enumerate(ids):  # arrive one by one, well apart
            jobs.append(_job(loop, p, pix[i : i + 1]))
            engine.submit(jobs[-1], expected=True)
            await asyncio.sleep(0.1)
        return [await asyncio.wait_for(j.events.get(), 60) for j in jobs]

    try:
        done = asyncio.run(staggered())
    finally:
        engine.stop()
    assert engine.stats["prefills"] == 1 and engine.stats["prefill_rows"] == len(ids)
    assert engine.expected == 0
    for d, r in zip(done, ref, strict=True):
        assert isinstance(d, Done)
        assert (d.text, d.completion_tokens, d.prompt_tokens) == (r.text.strip(), len(r.token_ids), r.prompt_tokens)


def test_gathering_never_holds_a_lone_request(model, prompts):
    """Nothing announced: a request starts at once, however long ``gather_ms``; an announced
    request that is withdrawn (a 4xx, a client gone) stops the wait."""
    ids, pix = prompts
    engine = Engine(model, max_batch=8, gather_ms=60_000).start()

    async def lone() -> Event:
        job = _job(asyncio.get_running_loop(), ids[0], pix[:1])
        engine.submit(job)
        return await asyncio.wait_for(job.events.get(), 30)

    async def withdrawn() -> Event:
        job = _job(asyncio.get_running_loop(), ids[1], pix[1:2])
        engine.expect()
        engine.expect()
        engine.submit(job, expected=True)
        await asyncio.sleep(0.3)
        assert job.events.empty()  # held: the other announced request may still come
        engine.withdraw()
        return await asyncio.wait_for(job.events.get(), 30)

    try:
        assert isinstance(asyncio.run(lone()), Done)
        assert isinstance(asyncio.run(withdrawn()), Done)
    finally:
        engine.stop()
    assert engine.expected == 0 and engine.stats["prefills"] == 2


def test_events_of_a_step_reach_the_loop_in_one_wakeup(model, prompts):
    """Rows that finish (or stream a token) in the same step are handed to the loop together:
    one ``call_soon_threadsafe`` per step, not one per event."""
    ids, pix = prompts
    engine = Engine(model, max_batch=8, gather_ms=60_000).start()
    calls = []

    async def cohort(stream: bool) -> list[list]:
        loop = asyncio.get_running_loop()
        wake = loop.call_soon_threadsafe

        def counted(*args):
            calls.append(args)
            return wake(*args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        jobs = [_job(loop, ids[1], pix[1:2], n=4, stream=stream) for _ in range(4)]
        for _ in jobs:
            engine.expect()
        for j in jobs:
            engine.submit(j, expected=True)
        out = []
        for j in jobs:
            events = [await asyncio.wait_for(j.events.get(), 60)]
            while isinstance(events[-1], Delta):
                events.append(await asyncio.wait_for(j.events.get(), 60))
            out.append(events)
        return out

    try:
        plain = asyncio.run(cohort(stream=False))
        assert len(calls) == 1  # 4 x Done from the same step
        calls.clear()
        streamed = asyncio.run(cohort(stream=True))
    finally:
        engine.stop()
    assert [[type(e) for e in evs] for evs in plain] == [[Done]] * 4
    assert all(evs[-1] == plain[0][0] for evs in streamed)
    deltas = sum(len(evs) - 1 for evs in streamed)
    assert len(calls) <= 4 < deltas + 4  # one wake-up per step (4 tokens), not one per event
