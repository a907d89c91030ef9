"""The worker's side of the jobs' streams: append messages, and learn which clients left.

The scheduler thread never waits on Redis: it hands each step's messages to the `Publisher`,
whose own thread writes everything that has piled up, for every job, in one pipeline that also
reads every one of those jobs' cancel flags: at once for a job's first token or its end (time to
first token, and a short request's latency), otherwise at most every `interval_s`
(`FERRY_STREAM_INTERVAL_MS`). When the scheduler says a job is done, its `JobOutput` resolves once
the last of its messages is in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis

from shared import keys
from shared.jobs import Delta, Final, Logprobs, StreamMessage, add_tool_call, encode, is_cancelled

log = logging.getLogger(__name__)

STEPS_PER_WRITE = 2  # decode steps a write of a stream's middle carries, at least
MAX_STRETCH = 4  # ... unless that is longer than this many `interval_s`


class JobOutput:
    """One job's side of publishing: what went out, whether the client left, when it ended.

    Keeps choice 0's text and tool calls (a run stores them as the reply) and, with
    `hold_final`, keeps `final` back so the reply is stored before the client sees the end.
    """

    def __init__(self, job_id: str, hold_final: bool, loop: asyncio.AbstractEventLoop,
                 keep_s: int | None = None) -> None:
        self.job_id = job_id
        self.keep_s = keep_s  # how long the stream is kept (None: the publisher's default)
        self.hold_final = hold_final
        self.parts: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []  # choice 0's, as OpenAI shows them
        self.finish_reason: str | None = None  # choice 0's
        self.final: Final | None = None
        self.first_token_at: float | None = None  # unix time
        self.cancelled = False  # the client asked the job to stop
        self.posted_at: float | None = None  # monotonic time the scheduler last posted
        self.expiry_set_at = float("-inf")  # monotonic time its stream's expiry was last set
        self.error: BaseException | None = None  # publishing failed
        self._loop = loop
        self.done: asyncio.Future[None] = loop.create_future()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def outgoing(self, messages: Sequence[StreamMessage]) -> list[StreamMessage]:
        """Record `messages` and return those to publish."""
        out: list[StreamMessage] = []
        for m in messages:
            if isinstance(m, Delta):
                if self.first_token_at is None:
                    self.first_token_at = time.time()
                if m.index == 0:
                    self.parts.append(m.text)
                    self.finish_reason = m.finish_reason or self.finish_reason
                    if m.tool_call is not None:
                        add_tool_call(self.tool_calls, m.tool_call)
            elif isinstance(m, Final):
                self.final = m
                if self.hold_final:
                    continue
            out.append(m)
        return out

    def resolve(self) -> None:
        self._loop.call_soon_threadsafe(_set_done, self.done)


# What the scheduler posts: one job's messages of a step, and whether the job has no more.
Item = tuple[JobOutput, Sequence[StreamMessage], bool]


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Publisher:
    """A thread that writes queued messages to Redis, many jobs to one round trip.

    `interval_s`: the middle of streams is written at most this often, and at most every
    `STEPS_PER_WRITE` decode steps when steps are longer (many streams on a CPU), up to
    `MAX_STRETCH` times `interval_s`. Each write wakes Redis, the web process and its clients,
    whose work is per write more than per token (a write carries one delta per choice); on a busy
    CPU that costs the decode threads more than the wait costs a stream. Measured on 2 cores at
    one stream: web, publisher and Redis used 0.59-0.66 ms of CPU per streamed token writing every
    20 ms, 0.35 every 50 ms. At 8 streams a step takes ~45 ms, so 50 ms meant a write per token.
    """

    def __init__(self, client: redis.Redis, ttl_s: int, interval_s: float) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self.step_s = 0.0  # recent time between two posts of one job: about one decode step
        self._queue: queue.SimpleQueue[Item | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._loop, name="publisher", daemon=True)
        self._thread.start()

    def post(self, output: JobOutput, messages: Sequence[StreamMessage], done: bool) -> None:
        """Queue `messages` of `output`'s job; `done`: the job has no more. Never blocks."""
        now = time.monotonic()
        if output.posted_at is not None:
            gap = now - output.posted_at
            self.step_s = gap if not self.step_s else self.step_s + (gap - self.step_s) / 8
        output.posted_at = now
        self._queue.put((output, messages, done))

    def send(self, output: JobOutput, messages: Sequence[StreamMessage]) -> bool:
        """Publish `messages` as they are, at once, on the caller's thread; returns whether the
        client asked to stop."""
        return self._write([(output, messages, True)])[output.job_id]

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        last = 0.0
        while True:
            items = self._gather(deadline=last + self._cadence())
            last = time.monotonic()
            stop = None in items
            batch = [i for i in items if i is not None]
            try:
                cancelled = self._write(_per_job(batch))
                for output, _, _ in batch:
                    output.cancelled = output.cancelled or cancelled[output.job_id]
            except (redis.RedisError, OSError) as e:
                log.warning("could not publish to Redis: %s", e)
                for output, _, _ in batch:
                    output.error, output.cancelled = e, True
            for output, _, done in batch:
                if done:
                    output.resolve()
            if stop:
                return

    def _cadence(self) -> float:
        """How long the middle of streams waits between writes."""
        return min(max(self.interval_s, STEPS_PER_WRITE * self.step_s),
                   MAX_STRETCH * self.interval_s)

    def _gather(self, deadline: float) -> list[Item | None]:
        """What to write next: the queue's items up to `deadline` (let a few steps pile up: one
        write, one wake-up of the readers), or up to the first that must go at once."""
        items = [self._queue.get()]
        while not _urgent(items[-1]) and (wait := deadline - time.monotonic()) > 0:
            try:
                items.append(self._queue.get(timeout=wait))
            except queue.Empty:
                break
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _write(self, batch: Sequence[Item]) -> dict[str, bool]:
        """One pipeline: every message in order, the streams' expiry where it is due, and one
        MGET of the jobs' cancel flags. The expiry is renewed at a job's end and otherwise every
        quarter of its lifetime, not at every write: Redis' work per token is what limits how
        many workers one Redis feeds."""
        jobs: dict[str, JobOutput] = {}
        now = time.monotonic()
        with self.client.pipeline(transaction=False) as pipe:
            for output, messages, done in batch:
                jobs[output.job_id] = output
                for message in messages:
                    pipe.xadd(keys.stream(output.job_id), {"m": encode(message)})
                keep_s = output.keep_s or self.ttl_s
                if done or now - output.expiry_set_at > keep_s / 4:
                    pipe.expire(keys.stream(output.job_id), keep_s)
                    output.expiry_set_at = now
            pipe.mget([keys.job_cancel(job_id) for job_id in jobs])
            flags = pipe.execute()[-1]
        return {job_id: is_cancelled(flag) for job_id, flag in zip(jobs, flags, strict=True)}


def _per_job(batch: Sequence[Item],
             ) -> list[tuple[JobOutput, list[StreamMessage], bool]]:
    """One entry per job: all it queued since the last write, recorded, then coalesced."""
    jobs: dict[JobOutput, tuple[list[StreamMessage], bool]] = {}
    for output, messages, done in batch:
        held, ended = jobs.setdefault(output, ([], False))
        held.extend(messages)
        jobs[output] = (held, ended or done)
    return [(a, coalesce(a.outgoing(m)), done) for a, (m, done) in jobs.items()]


def coalesce(messages: Sequence[StreamMessage]) -> list[StreamMessage]:
    """Each choice's text (and logprobs) written together as one delta: a write carries one
    chunk per choice, however many tokens piled up since the last (vLLM's `stream_interval`).
    Each message costs Redis, the web process and the client more than its bytes do. A tool
    call's piece, a finish and anything after them keep their place."""
    out: list[StreamMessage] = []
    open_: dict[int, int] = {}  # choice index -> position in `out` of a delta text may join
    for m in messages:
        if not isinstance(m, Delta):
            open_.clear()
            out.append(m)
            continue
        at = open_.pop(m.index, None)
        if at is not None and m.tool_call is None:
            head = out[at]
            assert isinstance(head, Delta)
            out[at] = m = Delta(index=m.index, text=head.text + m.text,
                                logprobs=_join(head.logprobs, m.logprobs),
                                finish_reason=m.finish_reason, stop_sequence=m.stop_sequence,
                                usage=head.usage or m.usage)
        else:
            at = len(out)
            out.append(m)
        if m.tool_call is None and m.finish_reason is None:
            open_[m.index] = at
    return out


def _join(a: Logprobs | None, b: Logprobs | None) -> Logprobs | None:
    if a is None or b is None:
        return a or b
    return Logprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                    top_logprobs=a.top_logprobs + b.top_logprobs,
                    text_offset=a.text_offset + b.text_offset)


def _urgent(item: Item | None) -> bool:
    """A job's end, its first token, or the publisher's stop: no reason to wait."""
    if item is None:
        return True
    output, messages, done = item
    return done or (output.first_token_at is None and bool(messages))
