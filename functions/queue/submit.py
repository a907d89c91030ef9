"""The handler's side of the queue: put a job on its model's queue.

A job is arq's: its payload under arq's job key and its id in the model's queue (a sorted set),
so arq workers take it as their own. The handler writes it with one script that refuses it when
the queue is full, records what a reader needs to render it (`JobMeta`) and wakes an idle worker.
"""

from __future__ import annotations

import asyncio
import time

from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from pydantic import BaseModel

from functions.queue import route
from shared import keys, telemetry
from shared.errors import NoWorker, QueueFull
from shared.fleet import cache_map, control, liveness
from shared.fleet.liveness import WorkerInfo
from shared.jobs import AHEAD_MS, EmbeddingJob, GenerationJob, Route
from shared.redis import serialize
from shared.settings import Settings

GENERATE, EMBED = "generate", "embed"  # the worker's job functions


class JobMeta(BaseModel):
    """What a reader needs to render a job's stream, kept beside the stream for resumes."""

    id: str
    kind: str
    model: str
    created: int
    include_usage: bool = False
    choices: int = 1  # how many choices the answer has
    detached: bool = False  # an async request: no reader leaving ever cancels it
    route: Route | None = None  # the worker it was sent to, and why (several serve its model)


# arq's `enqueue_job` (its job key, payload and queue score), but only while the queue holds
# fewer than the limit: checking the depth and enqueueing are one step, so a burst cannot overfill.
# An interactive job does not count the batch lines queued (KEYS[4]): a batch's window may fill
# the queue, never to refuse a user. A routed job's worker is recorded in the same step, before any
# worker can see the job.
ADMIT = """
local depth = redis.call('ZCARD', KEYS[1])
if ARGV[7] == '0' then depth = depth - redis.call('SCARD', KEYS[4]) end
if depth >= tonumber(ARGV[1]) then return 0 end
redis.call('PSETEX', KEYS[2], ARGV[2], ARGV[3])
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
  redis.call('EXPIRE', KEYS[3], 86400)
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[5])
return 1
"""


async def submit(redis: ArqRedis, job: GenerationJob | EmbeddingJob, meta: JobMeta,
                 settings: Settings) -> None:
    """Enqueue `job` on its model's queue, or fail fast with 429 / 503. A `background` job (a
    batch line) waits behind every interactive one: arq takes the lowest score first, and an
    interactive job's score is its time less `AHEAD_MS`. With several workers on the model, a
    chat goes to the one whose cache holds its start (`route`)."""
    workers = await wait_for_worker(redis, job.model, settings)
    routed: Route | None = None
    if isinstance(job, GenerationJob):
        job.prefixes = cache_map.prefix_hashes(job)
    async with route.deciding(job, workers, settings):
        if isinstance(job, GenerationJob):
            job.route = meta.route = routed = await route.choose(redis, job, workers, settings)
        now = timestamp_ms()
        score = now if job.background else now - AHEAD_MS
        function = EMBED if isinstance(job, EmbeddingJob) else GENERATE
        payload = serialize_job(function, (), {"job": job.model_dump(mode="json")}, None, now,
                                serializer=serialize)
        admitted = await redis.register_script(ADMIT)(
            keys=[keys.queue(job.model), job_key_prefix + job.id, keys.model_prefer(job.model),
                  keys.batch_lines(job.model)],
            args=[settings.queue_limit, redis.expires_extra_ms, payload, score, job.id,
                  routed.worker if routed else "", int(job.background)])
    if not admitted:
        raise QueueFull(f"Too many requests queued for model '{job.model}'; retry shortly")
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(
            keys.job_meta(job.id), meta.model_dump_json(),
            ex=int(settings.job_timeout_s + (job.keep_s or settings.stream_ttl_s)),
        )
        # Wake an idle worker now rather than at its next poll: the one it was routed to, if any.
        wake = keys.wake_worker(job.model, routed.worker) if routed else keys.wake(job.model)
        pipe.rpush(wake, job.id)
        pipe.ltrim(wake, -64, -1)
        pipe.expire(wake, 60)
        if routed is not None:
            telemetry.count_route(pipe, job.model, routed.decision)
        await pipe.execute()


async def wait_for_worker(redis: ArqRedis, model: str, settings: Settings) -> list[WorkerInfo]:
    """The live workers holding `model`, once there is one: starting it on one when allowed
    (``auto_start``; then none are returned, as none has a cache yet), else waiting up to
    ``worker_wait_s`` for one (a worker restarting, say)."""
    deadline = time.monotonic() + settings.worker_wait_s
    while not (workers := await liveness.live_workers(redis, model)):
        if settings.auto_start and await liveness.all_workers(redis):
            await control.start(redis, settings, model)
            return []
        if time.monotonic() >= deadline:
            await telemetry.count_no_worker(redis, model)  # a pool scaled to zero sees demand
            raise NoWorker(f"No worker is serving model '{model}' right now; retry shortly")
        await asyncio.sleep(0.1)
    return workers
