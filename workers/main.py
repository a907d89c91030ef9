"""A long-lived arq worker serving one model on one device (a GPU or the CPU)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from typing import Any

import redis
from arq import Worker
from arq.worker import func

from shared import keys, liveness, models
from shared.liveness import WorkerInfo
from shared.redis import deserialize, redis_settings, serialize
from shared.settings import Settings

log = logging.getLogger(__name__)

WAKE_WAIT_S = 0.5  # longest an idle worker sleeps without a wake-up (arq's own poll delay)


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

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._job_done.set()

    async def _poll_iteration(self) -> None:
        await super()._poll_iteration()
        if self.job_counter < self.max_jobs:
            # Redis >= 6 takes fractional seconds; redis-py's hints say int.
            await self.pool.blpop([self.wake_key], timeout=WAKE_WAIT_S)  # type: ignore[arg-type]
            return
        # Busy: sleep until a job ends rather than spin, which would steal the CPU and the GIL
        # from the generation thread.
        self._job_done.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._job_done.wait(), WAKE_WAIT_S)


def build(settings: Settings, model: str, gpu: int | None = None, cpu: bool = False) -> FerryWorker:
    """A worker for `model`; ``gpu=N`` pins it to GPU N, ``cpu`` keeps every layer on the CPU."""
    if gpu is not None:
        # Must happen before llama.cpp initialises CUDA, i.e. before the engine is imported.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    url = settings.redis_url
    if url is None:
        raise SystemExit("REDIS_URL is not set: `ferry worker` needs a Redis (or use `ferry serve`)")
    record = models.resolve(model, settings.models_path)
    device = "cpu" if cpu else f"gpu:{gpu}" if gpu is not None else "auto"
    info = WorkerInfo(id=uuid.uuid4().hex[:12], pid=os.getpid(), device=device, model=record.id)

    async def startup(ctx: dict[str, Any]) -> None:
        from workers.engine import Engine
        from workers.state import WorkerState

        engine = await asyncio.to_thread(Engine.load, record, settings, not cpu)
        record.ctx_len = engine.n_ctx
        st = WorkerState(
            settings=settings, redis=ctx["redis"], engine=engine, info=info,
            stream_client=redis.Redis.from_url(url),
        )
        ctx["ferry"] = st
        await models.register_loaded(st.redis, record)
        await liveness.beat(st.redis, info, settings.heartbeat_ttl_s)
        ctx["heartbeat"] = asyncio.create_task(_heartbeat(st.redis, info, settings))
        log.info("worker %s serving %s from %s on %s", info.id, record.id, record.path, device)

    async def shutdown(ctx: dict[str, Any]) -> None:
        if "heartbeat" in ctx:
            ctx["heartbeat"].cancel()
        if "ferry" in ctx:
            await liveness.leave(ctx["redis"], info)
            ctx["ferry"].engine.close()
            ctx["ferry"].stream_client.close()

    from workers.generate import generate

    return FerryWorker(
        wake_key=keys.wake(record.id),
        functions=[func(generate, name="generate", max_tries=1)],
        queue_name=keys.queue(record.id),
        redis_settings=redis_settings(url),
        on_startup=startup,
        on_shutdown=shutdown,
        max_jobs=1,  # the engine runs one generation at a time; idle peers take the rest
        job_timeout=settings.job_timeout_s,
        keep_result=60,
        job_serializer=serialize,
        job_deserializer=deserialize,
        handle_signals=True,
    )


async def _heartbeat(redis: Any, info: WorkerInfo, settings: Settings) -> None:
    while True:
        try:
            await liveness.beat(redis, info, settings.heartbeat_ttl_s)
        except Exception:  # a blip in Redis must not kill the worker; the next beat retries
            log.warning("heartbeat failed", exc_info=True)
        await asyncio.sleep(settings.heartbeat_s)
