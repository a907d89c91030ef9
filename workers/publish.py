"""The worker's side of the jobs' streams: append messages, and learn which clients left.

The scheduler thread never waits on Redis: it hands each step's messages to the `Publisher`,
whose own thread writes everything that has piled up, for every job, in one pipeline that also
reads every one of those jobs' cancel flags: at once for a job's first token or its end (time to
first token, and a short request's latency), otherwise at most every `interval_s`
(`FERRY_STREAM_INTERVAL_MS`). When the scheduler says a job is done, its `JobOutput` resolves once
the last of its messages is in Redis.

Every message gets its entry id here, before it is first sent: `<ms>-<n>`, n counting the job's
messages from 1, so a reader can tell a gap, and a write sent again after a lost connection adds
nothing twice (Redis refuses an id it holds). While Redis is unreachable the messages wait here,
in order, and the jobs go on generating; when it is back they are written. A job whose messages
could not be written for `outage_s` (`FERRY_REDIS_OUTAGE_S`) is stopped, freeing its sequences.
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
from shared.jobs import (
    Delta,
    Final,
    Logprobs,
    StreamMessage,
    add_tool_call,
    encode,
    entry_id,
    is_cancelled,
)

log = logging.getLogger(__name__)

RETRY_S = 0.25  # while Redis is unreachable: how often a write is tried again
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
        self.numbered = 0  # messages given an entry id so far
        self.last_ms = 0  # the ms part of the last id given
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

    def number(self, messages: Sequence[StreamMessage]) -> list[tuple[str, bytes]]:
        """Each message encoded, with its entry id (`shared.jobs.entry_id`)."""
        out = []
        for message in messages:
            self.numbered += 1
            self.last_ms = max(self.last_ms, int(time.time() * 1000))
            out.append((entry_id(self.last_ms, self.numbered), encode(message)))
        return out

    def resolve(self) -> None:
        self._loop.call_soon_threadsafe(_set_done, self.done)


# What the scheduler posts: one job's messages of a step, and whether the job has no more.
Item = tuple[JobOutput, Sequence[StreamMessage], bool]
# What is written: one job's messages, numbered, and whether they are its last.
Entries = tuple[JobOutput, list[tuple[str, bytes]], bool]


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

    def __init__(self, client: redis.Redis, ttl_s: int, interval_s: float,
                 outage_s: float = 30.0) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self.outage_s = outage_s
        self.unwritten: list[Entries] = []  # in order; Redis was unreachable
        self.down_since: float | None = None  # monotonic
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
        """Publish `messages` as they are, at once, on the caller's thread (a job's last, after
        its stream: nothing of it waits in the publisher); returns whether the client asked to
        stop. While Redis is unreachable it tries again, for up to `outage_s`."""
        entries = [(output, output.number(messages), True)]
        deadline = time.monotonic() + self.outage_s
        while True:
            try:
                return self._write(entries)[output.job_id]
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(RETRY_S)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        last = 0.0
        while True:
            wait = RETRY_S if self.unwritten else self._cadence()
            items = self._gather(deadline=last + wait, block=not self.unwritten)
            last = time.monotonic()
            stop = None in items
            batch = self.unwritten + _per_job([i for i in items if i is not None])
            self.unwritten = []
            try:
                cancelled = self._write(batch)
                if self.down_since is not None:
                    log.warning("Redis is back: wrote what waited (%d jobs)", len(cancelled))
                self.down_since = None
                for output, _, _ in batch:
                    output.cancelled = output.cancelled or cancelled[output.job_id]
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                self._hold(batch, e)
                batch = []
            except redis.RedisError as e:
                log.warning("could not publish to Redis: %s", e)
                for output, _, _ in batch:
                    output.error, output.cancelled = e, True
            for output, _, done in batch:
                if done:
                    output.resolve()
            if stop:
                return

    def _hold(self, batch: list[Entries], error: BaseException) -> None:
        """Redis is unreachable: keep `batch` to write when it is back, unless it has been
        unreachable for `outage_s`; then every job waiting here stops (its sequences free)."""
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.warning("Redis unreachable (%s): holding the streams' messages for up to %.0f s",
                        error, self.outage_s)
        if now - self.down_since < self.outage_s:
            self.unwritten = batch
            return
        log.warning("Redis unreachable for %.0f s: stopping %d jobs", now - self.down_since,
                    len({o.job_id for o, _, _ in batch}))
        for output, _, done in batch:
            output.error, output.cancelled = error, True
            if done:
                output.resolve()

    def _cadence(self) -> float:
        """How long the middle of streams waits between writes."""
        return min(max(self.interval_s, STEPS_PER_WRITE * self.step_s),
                   MAX_STRETCH * self.interval_s)

    def _gather(self, deadline: float, block: bool = True) -> list[Item | None]:
        """What to write next: the queue's items up to `deadline` (let a few steps pile up: one
        write, one wake-up of the readers), or up to the first that must go at once. Not
        `block`ing: the items that come by `deadline`, if any."""
        items: list[Item | None] = []
        if block:
            items.append(self._queue.get())
        else:
            try:
                items.append(self._queue.get(timeout=max(deadline - time.monotonic(), 0)))
            except queue.Empty:
                return items
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

    def _write(self, batch: Sequence[Entries]) -> dict[str, bool]:
        """One pipeline: every message in order, the streams' expiry where it is due, and one
        MGET of the jobs' cancel flags. The expiry is renewed at a job's end and otherwise every
        quarter of its lifetime, not at every write: Redis' work per token is what limits how
        many workers one Redis feeds. An entry Redis holds already (written before a connection
        dropped) is refused by its id, and left so."""
        jobs: dict[str, JobOutput] = {}
        now = time.monotonic()
        with self.client.pipeline(transaction=False) as pipe:
            for output, entries, done in batch:
                jobs[output.job_id] = output
                for entry, data in entries:
                    pipe.xadd(keys.stream(output.job_id), {"m": data}, id=entry)
                keep_s = output.keep_s or self.ttl_s
                if done or now - output.expiry_set_at > keep_s / 4:
                    pipe.expire(keys.stream(output.job_id), keep_s)
                    output.expiry_set_at = now
            pipe.mget([keys.job_cancel(job_id) for job_id in jobs])
            replies = pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, redis.ResponseError) and "equal or smaller" not in str(reply):
                raise reply
        return {job_id: is_cancelled(flag) for job_id, flag in zip(jobs, replies[-1], strict=True)}


def _per_job(batch: Sequence[Item]) -> list[Entries]:
    """One entry per job: all it queued since the last write, recorded, coalesced, numbered."""
    jobs: dict[JobOutput, tuple[list[StreamMessage], bool]] = {}
    for output, messages, done in batch:
        held, ended = jobs.setdefault(output, ([], False))
        held.extend(messages)
        jobs[output] = (held, ended or done)
    return [(a, a.number(coalesce(a.outgoing(m))), done) for a, (m, done) in jobs.items()]


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
