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
from shared.jobs import AHEAD_MS
from shared.redis import deserialize, redis_settings, serialize
from workers.loaded_model import LoadedModel

log = logging.getLogger(__name__)

WAKE_WAIT_S = 0.5  # longest an idle consumer sleeps without a wake-up (arq's own poll delay)


class FerryWorker(Worker):
    """arq's worker, woken at once by a push on its model's wake list.

    arq sleeps `poll_delay` between looks at the queue; a handler pushes to ``keys.wake(model)``
    right after enqueueing, and an idle worker blocks on that list instead of sleeping, so a new
    job starts within a Redis round trip rather than up to half a second later.
    """

    def __init__(self, *, wake_key: str, **kwargs: Any) -> None:
        super().__init__(poll_delay=0, **kwargs)
        self.wake_key = wake_key
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
        ids = [j for j in job_ids if j.decode() not in self.tasks]
        if ids:
            running = await self.pool.mget([keys.arq_in_progress(j.decode()) for j in ids])
            await super().start_jobs([j for j, flag in zip(ids, running, strict=True) if flag is None])

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._job_done.set()

    async def _poll_iteration(self) -> None:
        await super()._poll_iteration()
        if self.job_counter < self.max_jobs and self.allow_pick_jobs:
            # Redis >= 6 takes fractional seconds; redis-py's hints say int.
            await self.pool.blpop([self.wake_key], timeout=WAKE_WAIT_S)  # type: ignore[arg-type]
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
        from workers.generate import generate

        loaded = self.loaded
        model = loaded.engine.record.id
        self.worker = FerryWorker(
            wake_key=keys.wake(model),
            functions=[func(generate, name="generate", max_tries=1)],
            queue_name=keys.queue(model),
            redis_settings=redis_settings(self.redis_url),
            ctx={"ferry": loaded},
            max_jobs=loaded.settings.parallel,  # the scheduler batches them; more wait in Redis
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
