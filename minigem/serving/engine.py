"""The generation engine: one worker thread runs continuous batching for all requests.

Requests (``Job``) wait in a bounded queue (full -> ``QueueFull``, answered 429). The worker
admits up to ``max_batch`` rows: new jobs are prefilled together and merged into the
running ``DecodeBatch``, then every row advances one token per step; finished rows leave at
once. Prefill is the costly part of a short answer, so newcomers are gathered into one
prefill forward: while a batch runs (see ``_admit``), and, while the batch is empty, for up
to ``gather_ms`` as long as requests that the API announced (``expect``: received, images
still being decoded in a worker thread) have not been submitted; with none announced, a lone
request starts at once.

Each job streams its events into its own asyncio queue on the server's loop: ``Delta(text)``
pieces that can no longer change, then one ``Done`` or ``Failed``. The worker hands over
all events of a step at once, with one ``loop.call_soon_threadsafe`` per loop (each call
wakes the loop, which then competes with the worker for the GIL). A job whose client went
away (``cancel()``) or whose deadline passed is dropped at its next token (or before it
starts).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from minigem.generation.batch import DecodeBatch, Row
from minigem.generation.decode import Generation, GenerationConfig

log = logging.getLogger("minigem.serving.engine")


class QueueFull(Exception):
    """The wait queue is at its limit."""


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    status: int  # 408 timeout, 500 internal error
    message: str


Event = Delta | Done | Failed


@dataclass
class Job:
    """One generation request, prepared by the API (prompt ids, pixels, settings)."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor | None
    pixel_values_aux: torch.Tensor | None
    gen: GenerationConfig
    timeout_s: float
    loop: asyncio.AbstractEventLoop
    stream: bool = True  # False: no Delta events, only Done / Failed
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.monotonic)
    submitted_at: float = 0.0  # time.monotonic() when the engine accepted it
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _sent: str = ""  # text already sent as deltas
    # the engine's list of (job, event) not yet handed to the loop (None: hand over at once)
    outbox: list[tuple[Job, Event]] | None = None

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self) -> bool:
        return time.monotonic() - self.created > self.timeout_s

    def emit(self, event: Event) -> None:
        """Send an event to the server's loop (from the worker thread): into the engine's
        outbox, or at once for a job outside an engine."""
        if self.outbox is not None:
            self.outbox.append((self, event))
        else:
            deliver(self.loop, [(self, event)])

    def stable_text(self, out: Generation, final: bool) -> None:
        """Emit the new text that no later token can change. Answers are stripped (as
        ``model.chat``); held back: trailing whitespace, a trailing partial UTF-8 character
        and any tail that may begin a stop string."""
        text = out.text.strip() if final else out.text.lstrip()
        if not final:
            text = text.rstrip("\ufffd")
            for stop in self.gen.stop:
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        text = text[:-k]
                        break
            text = text.rstrip()
        if len(text) > len(self._sent) and text.startswith(self._sent):
            self.emit(Delta(text[len(self._sent):]))
            self._sent = text


def deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[Job, Event]]) -> None:
    """Put events into their jobs' queues, all in one callback on ``loop``."""

    def put() -> None:
        for job, event in items:
            job.events.put_nowait(event)

    try:
        loop.call_soon_threadsafe(put)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        for job, _ in items:
            job.cancel()


class Engine:
    """Owns the model and its worker thread; ``submit`` is safe from any thread."""

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, max_wait_steps: int = 8,
                 gather_ms: float = 10.0) -> None:
        self.model = model
        self.max_batch, self.max_queue, self.max_wait_steps = max_batch, max_queue, max_wait_steps
        self.gather_s = gather_ms / 1e3
        self._waited = 0  # decode steps the waiting jobs have been held back
        self._expected = 0  # requests announced by ``expect`` and not yet submitted / withdrawn
        self._outbox: list[tuple[Job, Event]] = []  # events of the current step (worker only)
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        # held by the worker for each prefill + decode step; other users of the model that
        # must not overlap a step (``minigem.explain`` switches attention kinds) take it too
        self.model_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.running = 0
        self.stats = collections.Counter()

    # ------------------------------------------------------------------ control

    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="minigem-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def expected(self) -> int:
        return self._expected

    def expect(self) -> None:
        """Announce a request that will be submitted soon (``submit(job, expected=True)``) or
        ``withdraw``n: an idle worker may wait up to ``gather_ms`` to prefill it with others."""
        with self._cv:
            self._expected += 1

    def withdraw(self) -> None:
        """An announced request will not come (it failed validation, its client left)."""
        with self._cv:
            self._expected -= 1
            self._cv.notify()

    def submit(self, job: Job, expected: bool = False) -> None:
        """Queue ``job``; ``expected``: it was announced with ``expect``."""
        with self._cv:
            if expected:
                self._expected -= 1
            self._cv.notify()
            if len(self._pending) >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull
            job.submitted_at, job.outbox = time.monotonic(), self._outbox
            self._pending.append(job)

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        batch = DecodeBatch(self.model)
        while True:
            with self._cv:
                while not self._stopping:
                    if not self._pending and not len(batch):
                        self._cv.wait()
                    elif (wait := self._gather_wait(batch)) > 0:
                        self._cv.wait(wait)
                    else:
                        break
                if self._stopping:
                    break
                admit = self._admit(batch)
            try:
                with self.model_lock:
                    t0 = time.perf_counter()
                    if admit:
                        self._prefill(batch, admit)
                        self.stats["prefills"] += 1
                        self.stats["prefill_rows"] += len(admit)
                    for row in batch.step():
                        self._finish(row.tag, row.out)
                    self.stats["steps"] += 1
                    self.stats["busy_ms"] += int((time.perf_counter() - t0) * 1e3)
            except Exception:  # a bug must not kill the worker: fail the batch, carry on
                log.exception("generation failed")
                for row in batch.cancel_all():
                    self._fail(row.tag, 500, "internal error during generation")
            self.running = len(batch)
            self._flush()
        for row in batch.cancel_all():
            self._fail(row.tag, 503, "the server is shutting down")
        while self._pending:
            self._fail(self._pending.popleft(), 503, "the server is shutting down")
        self._flush()

    def _flush(self) -> None:
        """Hand the step's events to their loops: one wake-up per loop."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
        for job, event in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, event))
        self._outbox.clear()
        for loop, items in by_loop.items():
            deliver(loop, items)

    def _gather_wait(self, batch: DecodeBatch) -> float:
        """Seconds an idle worker should still wait for announced requests before it prefills
        the waiting ones (0: go now). Called with the lock held."""
        if len(batch) or not self._expected or len(self._pending) >= self.max_batch:
            return 0.0
        return self._pending[0].submitted_at + self.gather_s - time.monotonic()

    def _admit(self, batch: DecodeBatch) -> list[Job]:
        """Jobs that join now (called with the lock held).

        Prefill is the costly part of a short request, and one forward for several newcomers
        costs far less than one each. So while a batch runs, waiting jobs join only once as
        many wait as are running (or they would fill the batch), or the oldest has waited
        ``max_wait_steps`` decode steps (as TGI's waiting_served_ratio / max_waiting_tokens).
        """
        admit: list[Job] = []
        if not batch.can_join() or not self._pending:
            return admit
        free = self.max_batch - len(batch)
        if len(batch) and self._waited < self.max_wait_steps and len(self._pending) < min(free, len(batch)):
            self._waited += 1
            return admit
        self._waited = 0
        while self._pending and len(batch) + len(admit) < self.max_batch:
            job = self._pending.popleft()
            if job.cancelled:
                self.stats["cancelled"] += 1
            elif job.expired():
                self._fail(job, 408, "the request timed out while waiting in the queue")
            else:
                admit.append(job)
        return admit

    def _prefill(self, batch: DecodeBatch, jobs: list[Job]) -> None:
        pix = [j.pixel_values for j in jobs if j.pixel_values is not None]
        aux = [j.pixel_values_aux for j in jobs if j.pixel_values_aux is not None]
        rows = [Row(gen=j.gen, tag=j, on_token=self._callback(j)) for j in jobs]
        try:
            batch.add([j.prompt_ids for j in jobs], torch.cat(pix) if pix else None,
                      torch.cat(aux) if aux else None, rows)
        except Exception:
            log.exception("prefill failed")
            for j in jobs:
                self._fail(j, 500, "internal error while reading the prompt")
        self.running = len(batch)
        self.stats["peak_batch"] = max(self.stats["peak_batch"], self.running)

    def _callback(self, job: Job):
        def on_token(out: Generation) -> bool:
            if job.cancelled or job.expired():
                return False
            if job.stream:
                job.stable_text(out, final=False)
            return True

        return on_token

    def _finish(self, job: Job, out: Generation) -> None:
        if out.finish_reason == "cancelled":
            if job.cancelled:
                self.stats["cancelled"] += 1
            else:
                self._fail(job, 408, f"the request timed out after {job.timeout_s:g} s")
            return
        if job.stream:
            job.stable_text(out, final=True)
        self.stats["completed"] += 1
        job.emit(Done(out.text.strip(), out.finish_reason, out.prompt_tokens, len(out.token_ids)))

    def _fail(self, job: Job, status: int, message: str) -> None:
        self.stats["timeouts" if status == 408 else "failed"] += 1
        job.emit(Failed(status, message))
