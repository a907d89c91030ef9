"""The handler's side of a job's stream: read its messages back, live or from any position.

Chunks travel on a Redis Stream per job (not pub/sub): the worker appends, the handler reads from
any position, so nothing is lost when the handler starts reading late, and a dropped client can
resume from the last entry id it saw while the stream is kept (``stream_ttl_s``). A process's
readers share one XREAD (`functions.queue.hub`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from types import TracebackType

from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from functions.queue.handle import JobState, job_state, request_cancel, withdraw
from functions.queue.hub import Follow, StreamHub
from functions.queue.submit import JobMeta, submit
from shared import keys
from shared.errors import NotFound, NoWorker, WorkerLost
from shared.errors import Unavailable as StreamLost
from shared.fleet import liveness
from shared.jobs import Delta, Error, Final, GenerationJob, decode, entry_number
from shared.settings import Settings

log = logging.getLogger(__name__)

READ_BLOCK_MS = 500  # a reader with nothing new this long checks the worker's liveness, pings


async def load_meta(redis: ArqRedis, job_id: str, started: bool = True) -> JobMeta:
    """What a reader needs to render the job; 404 if it is unknown, or (`started`) has no
    stream yet or any more."""
    raw = await redis.get(keys.job_meta(job_id))
    if raw is None or (started and not await redis.exists(keys.stream(job_id))):
        raise NotFound(f"No stream '{job_id}' (unknown, or no longer kept)", code="stream_not_found")
    return JobMeta.model_validate_json(raw)


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
        self.number = entry_number(after)  # of the last message relayed (`shared.jobs.entry_id`)
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
            # token once the grace period has passed with no reader back (Last-Event-ID). With
            # Redis unreachable it cannot be told: it stops when its own wait for Redis ends.
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
                await asyncio.shield(request_cancel(self.redis, self.job_id, self.settings,
                                                    after_s=self.settings.resume_grace_s))

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
                if self.hub.steady:  # else Redis is away, or just back: the hub reads on
                    try:
                        unstarted_since = await self._check_alive(unstarted_since)
                    except (RedisConnectionError, RedisTimeoutError, OSError):
                        pass  # Redis went away since: the hub finds out
                yield None
                continue
            if isinstance(got, BaseException):
                raise got
            unstarted_since = None
            batch: list[tuple[str, Delta]] = []
            for entry_id, fields in got:
                self.last_id = entry_id.decode()
                message = decode(fields[b"m"])
                if not isinstance(message, Error) and entry_number(entry_id) != self.number + 1:
                    self._ended = True  # entries lost (Redis restarted without its data)
                    raise StreamLost("Part of this response was lost when Redis restarted; "
                                     "retry the request", code="stream_lost")
                self.number += 1
                if isinstance(message, Delta):
                    batch.append((self.last_id, message))
                    continue
                if batch:
                    yield batch
                self._ended = True
                if isinstance(message, Final):
                    self.final = message
                    return
                raise message.exception()
            if batch:
                yield batch

    async def _check_alive(self, unstarted_since: float | None) -> float | None:
        """Raise if nobody will ever write to this stream; returns the updated 'waiting' clock."""
        lost = WorkerLost("The worker running this request stopped responding; retry the request")
        state = await job_state(self.redis, self.job_id, self.settings)
        if state is JobState.RUNNING:
            return None
        if state is JobState.LOST:
            await self._abandon(lost)
        if await liveness.live_workers(self.redis, self.model):
            return None
        now = time.monotonic()
        if unstarted_since is None:
            return now
        if now - unstarted_since >= self.settings.worker_wait_s:
            # Taken by a worker that died before recording itself as the owner: lost, not unserved.
            await self._abandon(lost if state is JobState.TAKEN else NoWorker(
                f"No worker is serving model '{self.model}' right now"))
        return unstarted_since

    async def _abandon(self, error: WorkerLost | NoWorker) -> None:
        """Take the job off the queue and record why in its stream, then raise."""
        self._ended = True
        await withdraw(self.redis, self.job_id, self.model, self.settings,
                       Error.of(error))
        log.warning("job %s abandoned: %s", self.job_id, error.message)
        raise error


async def count_prompt(redis: ArqRedis, hub: StreamHub, job: GenerationJob, settings: Settings
                       ) -> int:
    """Run a count-only job (`job.count_only`) and return its prompt tokens: what the worker's
    own template and tokenizer make of it, as the same request's usage would count them."""
    meta = JobMeta(id=job.id, kind=job.kind, model=job.model, created=int(time.time()))
    await submit(redis, job, meta, settings)
    async with JobStream(redis, hub, job.id, job.model, settings) as stream:
        async for _ in stream:
            pass
    assert stream.final is not None
    return stream.final.usage.prompt_tokens


async def read_all(redis: ArqRedis, job_id: str) -> list[Delta | Final | Error]:
    """Every message of the job's stream so far."""
    return [decode(f[b"m"]) for _, f in await redis.xrange(keys.stream(job_id))]


async def has_ended(redis: ArqRedis, job_id: str) -> bool:
    """Whether the job's stream holds its last message (a final or an error)."""
    return (await ended(redis, [job_id]))[0]


async def ended(redis: ArqRedis, job_ids: list[str]) -> list[bool]:
    """`has_ended` for each of the jobs, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.xrevrange(keys.stream(job_id), count=1)
        lasts = await pipe.execute()
    return [bool(last) and not isinstance(decode(last[0][1][b"m"]), Delta) for last in lasts]
