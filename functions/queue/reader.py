"""The handler's side of the queue: submit a job, then read its messages back.

Chunks travel on a Redis Stream per job (not pub/sub): the worker appends, the handler reads from
any position, so nothing is lost when the handler starts reading late, and a dropped client can
resume from the last entry id it saw while the stream is kept (``stream_ttl_s``). A process's
readers share one XREAD (`functions.streamhub`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from types import TracebackType

from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from pydantic import BaseModel

from functions.queue.hub import Follow, StreamHub
from shared import keys, telemetry
from shared.errors import NotFound, NoWorker, QueueFull, WorkerLost, from_wire
from shared.fleet import control, liveness
from shared.jobs import (
    AHEAD_MS,
    Delta,
    Error,
    Final,
    GenerationJob,
    cancel_value,
    decode,
    encode,
)
from shared.redis import serialize
from shared.settings import Settings

log = logging.getLogger(__name__)

GENERATE = "generate"  # the worker's job function
READ_BLOCK_MS = 500  # a reader with nothing new this long checks the worker's liveness, pings
# A live worker records itself as a job's owner within milliseconds of arq taking the job; one
# taken longer ago than this with no owner lost its worker in between.
TAKE_GRACE_S = 10.0


class JobMeta(BaseModel):
    """What a reader needs to render a job's stream, kept beside the stream for resumes."""

    id: str
    kind: str
    model: str
    created: int
    include_usage: bool = False
    choices: int = 1  # how many choices the answer has
    detached: bool = False  # an async request: no reader leaving ever cancels it


# arq's `enqueue_job` (its job key, payload and queue score), but only while the queue holds
# fewer than the limit: checking the depth and enqueueing are one step, so a burst cannot overfill.
ADMIT = """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('PSETEX', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[5])
return 1
"""


async def submit(redis: ArqRedis, job: GenerationJob, meta: JobMeta, settings: Settings,
                 background: bool = False) -> None:
    """Enqueue `job` on its model's queue, or fail fast with 429 / 503. A `background` job (a
    batch line) waits behind every interactive one: arq takes the lowest score first, and an
    interactive job's score is its time less `AHEAD_MS`."""
    await wait_for_worker(redis, job.model, settings)
    now = timestamp_ms()
    score = now if background else now - AHEAD_MS
    payload = serialize_job(GENERATE, (), {"job": job.model_dump(mode="json")}, None, now,
                            serializer=serialize)
    admitted = await redis.register_script(ADMIT)(
        keys=[keys.queue(job.model), job_key_prefix + job.id],
        args=[settings.queue_limit, redis.expires_extra_ms, payload, score, job.id])
    if not admitted:
        raise QueueFull(f"Too many requests queued for model '{job.model}'; retry shortly")
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(
            keys.job_meta(job.id), meta.model_dump_json(),
            ex=int(settings.job_timeout_s + (job.keep_s or settings.stream_ttl_s)),
        )
        # Wake an idle worker now rather than at its next poll.
        pipe.rpush(keys.wake(job.model), job.id)
        pipe.ltrim(keys.wake(job.model), -64, -1)
        pipe.expire(keys.wake(job.model), 60)
        await pipe.execute()


async def wait_for_worker(redis: ArqRedis, model: str, settings: Settings) -> None:
    """Return once a worker holds `model`: starting it on one when allowed (``auto_start``),
    else waiting up to ``worker_wait_s`` for one (a worker restarting, say)."""
    deadline = time.monotonic() + settings.worker_wait_s
    while not await liveness.live_workers(redis, model):
        if settings.auto_start and await liveness.all_workers(redis):
            await control.start(redis, settings, model)
            return
        if time.monotonic() >= deadline:
            await telemetry.count_no_worker(redis, model)  # a pool scaled to zero sees demand
            raise NoWorker(f"No worker is serving model '{model}' right now; retry shortly")
        await asyncio.sleep(0.1)


async def load_meta(redis: ArqRedis, job_id: str, started: bool = True) -> JobMeta:
    """What a reader needs to render the job; 404 if it is unknown, or (`started`) has no
    stream yet or any more."""
    raw = await redis.get(keys.job_meta(job_id))
    if raw is None or (started and not await redis.exists(keys.stream(job_id))):
        raise NotFound(f"No stream '{job_id}' (unknown, or no longer kept)", code="stream_not_found")
    return JobMeta.model_validate_json(raw)


async def reader_back(redis: ArqRedis, job_id: str) -> None:
    """A client resumed the stream: a cancel waiting out the grace period is called off."""
    value = await redis.get(keys.job_cancel(job_id))
    if value is not None and value.startswith(b"at:"):
        await redis.delete(keys.job_cancel(job_id))


async def deltas_upto(redis: ArqRedis, job_id: str, last_id: str) -> list[Delta]:
    """The deltas a resuming client already saw (so role chunks are not sent twice)."""
    if last_id in ("0", "0-0"):
        return []
    entries = await redis.xrange(keys.stream(job_id), "-", last_id)
    return [m for _, f in entries if isinstance(m := decode(f[b"m"]), Delta)]


class JobStream:
    """Iterates a job's messages; leaving before the end tells the worker to stop.

    Yields ``(entry_id, Delta)`` pairs, and ``None`` when nothing arrived for a tick (so a caller
    can send keep-alives). Ends after the job's `Final`, which is kept in `final`. An `Error`
    message, a dead worker or no worker at all raise the matching `FerryError`.
    """

    def __init__(
        self, redis: ArqRedis, hub: StreamHub, job_id: str, model: str, settings: Settings,
        after: str = "0-0", cancel_on_exit: bool = True,
    ) -> None:
        self.redis = redis
        self.hub = hub
        self._follow: Follow | None = None
        self.job_id = job_id
        self.model = model
        self.settings = settings
        self.last_id = after
        self.final: Final | None = None
        self.cancel_on_exit = cancel_on_exit  # False for runs: they outlive their readers
        self._ended = False

    async def __aenter__(self) -> JobStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._follow is not None:
            self.hub.leave(self._follow)
        if self.cancel_on_exit and not self._ended:
            # The client left (disconnect, cancel) or we gave up: the worker stops at its next
            # token once the grace period has passed with no reader back (Last-Event-ID).
            await asyncio.shield(self.redis.set(
                keys.job_cancel(self.job_id), cancel_value(self.settings.resume_grace_s),
                ex=self.settings.stream_ttl_s))

    async def __aiter__(self) -> AsyncIterator[tuple[str, Delta] | None]:
        async for batch in self.batches():
            if batch is None:
                yield None
            else:
                for item in batch:
                    yield item

    async def batches(self) -> AsyncIterator[list[tuple[str, Delta]] | None]:
        """As iterating, but the deltas that arrived together come as one list (never empty), so
        a streaming response can send them in one write."""
        follow = self._follow = await self.hub.follow(keys.stream(self.job_id), self.last_id)
        try:
            async for batch in self._read(follow):
                yield batch
        finally:
            self.hub.leave(follow)

    async def _read(self, follow: Follow) -> AsyncIterator[list[tuple[str, Delta]] | None]:
        unstarted_since: float | None = None
        while True:
            try:
                got = await asyncio.wait_for(follow.inbox.get(), READ_BLOCK_MS / 1000)
            except asyncio.TimeoutError:
                unstarted_since = await self._check_alive(unstarted_since)
                yield None
                continue
            if isinstance(got, BaseException):
                raise got
            unstarted_since = None
            batch: list[tuple[str, Delta]] = []
            for entry_id, fields in got:
                self.last_id = entry_id.decode()
                message = decode(fields[b"m"])
                if isinstance(message, Delta):
                    batch.append((self.last_id, message))
                    continue
                if batch:
                    yield batch
                self._ended = True
                if isinstance(message, Final):
                    self.final = message
                    return
                raise _error(message)
            if batch:
                yield batch

    async def _check_alive(self, unstarted_since: float | None) -> float | None:
        """Raise if nobody will ever write to this stream; returns the updated 'waiting' clock."""
        lost = WorkerLost("The worker running this request stopped responding; retry the request")
        owner = await self.redis.get(keys.job_worker(self.job_id))
        if owner is not None:
            if await liveness.is_alive(self.redis, owner.decode()):
                return None
            await self._abandon(lost)
        taken = await taken_s_ago(self.redis, self.job_id, self.settings)
        if taken is not None and taken > TAKE_GRACE_S:  # its worker died before owning it
            await self._abandon(lost)
        if await liveness.live_workers(self.redis, self.model):
            return None
        now = time.monotonic()
        if unstarted_since is None:
            return now
        if now - unstarted_since >= self.settings.worker_wait_s:
            # Taken by a worker that died before recording itself as the owner: lost, not unserved.
            await self._abandon(lost if taken is not None else NoWorker(
                f"No worker is serving model '{self.model}' right now"))
        return unstarted_since

    async def _abandon(self, error: WorkerLost | NoWorker) -> None:
        """Take the job off the queue and record why in its stream, then raise."""
        self._ended = True
        await withdraw(self.redis, self.job_id, self.model, self.settings,
                       Error(status=error.status, message=error.message, code=error.code))
        log.warning("job %s abandoned: %s", self.job_id, error.message)
        raise error


async def taken_s_ago(redis: ArqRedis, job_id: str, settings: Settings) -> float | None:
    """How long ago arq marked the job taken by a worker; None if it is not. arq sets the marker
    for the job timeout + 10 s (its `in_progress_timeout_s`): its age is that less what is left.
    A job taken over `TAKE_GRACE_S` ago whose owner was never recorded lost its worker."""
    left_ms = await redis.pttl(keys.arq_in_progress(job_id))
    return None if left_ms < 0 else settings.job_timeout_s + 10 - left_ms / 1000


async def withdraw(redis: ArqRedis, job_id: str, model: str, settings: Settings,
                   error: Error | None = None) -> None:
    """Take a job off its queue for good: arq forgets it, a worker still on it stops, and
    `error`, if given, ends its stream."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(keys.queue(model), job_id)
        pipe.delete(*keys.arq_job_keys(job_id))
        pipe.set(keys.job_cancel(job_id), cancel_value(), ex=settings.stream_ttl_s)
        if error is not None:
            pipe.xadd(keys.stream(job_id), {"m": encode(error)})
            pipe.expire(keys.stream(job_id), settings.stream_ttl_s)
        await pipe.execute()


async def read_all(redis: ArqRedis, job_id: str) -> list[Delta | Final | Error]:
    """Every message of the job's stream so far."""
    return [decode(f[b"m"]) for _, f in await redis.xrange(keys.stream(job_id))]


async def has_ended(redis: ArqRedis, job_id: str) -> bool:
    """Whether the job's stream holds its last message (a final or an error)."""
    last = await redis.xrevrange(keys.stream(job_id), count=1)
    return bool(last) and not isinstance(decode(last[0][1][b"m"]), Delta)


def _error(message: Error) -> Exception:
    return from_wire(message.status, message.message, message.code, message.param)
