"""One loaded model inside a worker process: its engine, and an arq worker consuming its queue.

A worker process holds one `ModelConsumer` per loaded model; each consumes only its own model's
queue, so a job runs only where its model is loaded. Closing one stops it taking jobs, lets the
ones in flight finish, then frees the model; a worker that must stop sooner ends them first
(`end_jobs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from arq import Worker
from arq.utils import timestamp_ms
from arq.worker import func

from shared import keys
from shared.fleet import cache_map
from shared.jobs import AHEAD_MS
from shared.redis import deserialize, redis_settings, serialize
from workers.engine.engine import Engine
from workers.loaded_model import LoadedModel

log = logging.getLogger(__name__)

WAKE_WAIT_S = 0.5  # longest an idle consumer sleeps without a wake-up (arq's own poll delay)


class FerryWorker(Worker):
    """arq's worker, woken at once by a push on its model's wake list, or its own.

    arq sleeps `poll_delay` between looks at the queue; a handler pushes to ``keys.wake(model)``
    (or, for a job routed to one worker, to that worker's) right after enqueueing, and an idle
    worker blocks on those lists instead of sleeping, so a new job starts within a Redis round trip
    rather than up to half a second later.

    It takes interactive jobs while fewer than the engine's `capacity` (`FERRY_PARALLEL`) run:
    the engine pauses batch lines for them. It takes batch lines while fewer than
    `batch_capacity` (every sequence) plus `ahead` jobs of any kind run, so that lines wait in
    the engine, which starts one in the very step another ends, rather than in Redis.
    """

    def __init__(self, *, model: str, worker_id: str, route_wait_ms: int, capacity: int,
                 batch_capacity: int, **kwargs: Any) -> None:
        self.capacity, self.batch_capacity = capacity, batch_capacity
        self.ahead = max(2, batch_capacity // 2)
        super().__init__(poll_delay=0, queue_name=keys.queue(model),
                         max_jobs=capacity + batch_capacity + self.ahead, **kwargs)
        self.worker_id = worker_id
        self.wake_keys = [keys.wake_worker(model, worker_id), keys.wake(model)]
        self.prefer_key = keys.model_prefer(model)
        self.route_wait_ms = route_wait_ms
        self.interactive: set[str] = set()  # ids of the interactive jobs taken
        self._job_done = asyncio.Event()

    async def run_job(self, job_id: str, score: int) -> None:
        # An interactive job is queued AHEAD_MS early (ahead of batch lines): arq logs, and puts
        # in the job's context, the time it was really queued.
        if score < timestamp_ms() - AHEAD_MS // 2:
            score += AHEAD_MS
        await super().run_job(job_id, score)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # arq's queue holds running jobs too, and it tries each id in turn at four round trips
        # apiece: pass over this worker's own jobs, and those another worker runs (one MGET of
        # their in-progress keys). arq still checks each remaining id itself before taking it.
        # The ids come lowest score first: interactive jobs, then batch lines (`AHEAD_MS`).
        # A job routed to another worker is left to it for `route_wait_ms`.
        ids = [j for j in job_ids if j.decode() not in self.tasks]
        if not ids:
            return
        async with self.pool.pipeline(transaction=False) as pipe:
            pipe.mget([keys.arq_in_progress(j.decode()) for j in ids])
            pipe.zmscore(self.queue_name, [j.decode() for j in ids])
            pipe.hmget(self.prefer_key, [j.decode() for j in ids])
            running, scores, routed = await pipe.execute()
        now = timestamp_ms()
        interactive_before = now - AHEAD_MS // 2
        self.interactive = {j for j in self.interactive if j in self.tasks and not self.tasks[j].done()}
        interactive, jobs = len(self.interactive), self.job_counter
        take = []
        for job_id, flag, score, to in zip(ids, running, scores, routed, strict=True):
            if flag is not None or score is None:  # another worker's, or gone
                continue
            if to is not None and to.decode() != self.worker_id \
                    and now - (score + AHEAD_MS) < self.route_wait_ms:
                continue  # routed (an interactive job) to another worker, which may yet take it
            if score < interactive_before:
                if interactive >= self.capacity:
                    continue  # every sequence serves an interactive job: another worker may
                interactive += 1
                self.interactive.add(job_id.decode())
            elif jobs >= self.batch_capacity + self.ahead or interactive >= self.capacity:
                continue  # a batch line: enough wait in the engine, or none would start soon
            take.append(job_id)
            jobs += 1
        await super().start_jobs(take)

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._job_done.set()

    async def _poll_iteration(self) -> None:
        await super()._poll_iteration()
        if self.job_counter < self.max_jobs and self.allow_pick_jobs:
            # Redis >= 6 takes fractional seconds; redis-py's hints say int.
            await self.pool.blpop(self.wake_keys, timeout=WAKE_WAIT_S)  # type: ignore[arg-type]
            return
        # Busy: sleep until a job ends rather than spin, which would steal the CPU and the GIL
        # from the generation thread.
        self._job_done.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._job_done.wait(), WAKE_WAIT_S)


class ModelConsumer:
    """One loaded model's arq consumer: takes its queue's jobs, and stops, revives or ends them."""

    def __init__(self, loaded: LoadedModel, redis_url: str) -> None:
        self.loaded = loaded
        self.redis_url = redis_url
        self._consume()

    def _consume(self) -> None:
        from workers.embed import embed
        from workers.generate import generate

        loaded = self.loaded
        model = loaded.engine.record.id
        self.worker = FerryWorker(
            model=model, worker_id=loaded.worker_id, route_wait_ms=loaded.settings.route_wait_ms,
            functions=[func(generate, name="generate", max_tries=1),
                       func(embed, name="embed", max_tries=1)],
            redis_settings=redis_settings(self.redis_url),
            ctx={"ferry": loaded},
            capacity=loaded.engine.capacity,  # the engine batches them; more wait in Redis
            batch_capacity=loaded.engine.batch_capacity,
            job_timeout=loaded.settings.job_timeout_s,
            keep_result=60,
            job_serializer=serialize,
            job_deserializer=deserialize,
            handle_signals=False,  # the worker process stops its consumers itself
        )
        self.task = asyncio.create_task(self.worker.async_run(), name=f"consumer:{model}")

    def revive(self) -> None:
        """Start a new arq worker if the last one died (Redis went away, say); the model stays."""
        if self.task.done():
            error = None if self.task.cancelled() else self.task.exception()
            log.warning("consumer of %s stopped (%r); starting another", self.loaded.usage.id, error)
            self._consume()

    async def publish_cache_map(self) -> None:
        """Make this worker's cache map what the engine's caches hold now, alive until the next
        heartbeat is due (`shared.fleet.cache_map`); an embedding model has none."""
        engine, loaded = self.loaded.engine, self.loaded
        if not isinstance(engine, Engine):
            return
        entries = engine.cache_entries().union(*loaded.claimed.values())  # those not started too
        async with loaded.redis.pipeline(transaction=True) as pipe:
            cache_map.replace(pipe, loaded.usage.id, loaded.worker_id, entries,
                              loaded.settings.heartbeat_ttl_s)
            await pipe.execute()

    def stop_taking(self) -> None:
        self.worker.allow_pick_jobs = False

    @property
    def in_flight(self) -> int:
        """Jobs arq has taken from the queue and not finished."""
        return self.worker.job_counter

    def end_jobs(self) -> None:
        """End every job in flight at the scheduler's next step with `worker_stopping`."""
        self.loaded.stopping = True
        for output in list(self.loaded.outputs):
            output.cancelled = True

    async def close(self) -> None:
        """Stop taking jobs, wait for those in flight (up to the job timeout), free the model."""
        self.stop_taking()
        deadline = asyncio.get_running_loop().time() + self.loaded.settings.job_timeout_s
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        with contextlib.suppress(asyncio.CancelledError):
            await self.worker.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await asyncio.to_thread(self.loaded.engine.close)
