"""What a handler does to a job once it is queued: ask it to stop, take it back, and tell
whether anyone is still running it.

A cancel is a key the worker reads at every write of the job's stream (`keys.job_cancel`): `1`
stops it at its next token; `at:<time>` stops it then, unless a reader comes back first (a dropped
stream's grace period). Whether a job's worker is gone is answered here alone: by its owner's
heartbeat once a worker recorded itself as the owner, by arq's in-progress marker before that.
"""

from __future__ import annotations

import enum

from arq.connections import ArqRedis

from shared import keys
from shared.errors import WorkerLost
from shared.fleet import liveness
from shared.jobs import Delta, Error, Final, cancel_value, encode
from shared.settings import Settings

# A live worker records itself as a job's owner within milliseconds of arq taking the job; one
# taken longer ago than this with no owner lost its worker in between.
TAKE_GRACE_S = 10.0


class JobState(enum.Enum):
    QUEUED = "queued"  # no worker has taken it (or, with a model given, not even queued: LOST)
    TAKEN = "taken"  # arq marked it taken a moment ago; its worker has not recorded itself yet
    RUNNING = "running"  # owned by a worker whose heartbeat is alive
    LOST = "lost"  # its worker died under it, or after taking it but before owning it


async def request_cancel(redis: ArqRedis, job_id: str, settings: Settings,
                         after_s: float = 0) -> None:
    """Ask the job's worker to stop at its next token; with `after_s`, only once that has passed
    with no reader back (`call_off_cancel`)."""
    await redis.set(keys.job_cancel(job_id), cancel_value(after_s), ex=settings.stream_ttl_s)


async def call_off_cancel(redis: ArqRedis, job_id: str) -> None:
    """A client resumed the stream: a cancel waiting out the grace period is called off."""
    value = await redis.get(keys.job_cancel(job_id))
    if value is not None and value.startswith(b"at:"):
        await redis.delete(keys.job_cancel(job_id))


async def job_state(redis: ArqRedis, job_id: str, settings: Settings,
                    model: str | None = None) -> JobState:
    """Where the job is, for a job whose stream has not ended. With `model`, a job that is not in
    that model's queue at all (it never got there, or arq dropped it: a job arq finds orphaned
    after its worker died is not run again) is lost too."""
    owner = await redis.get(keys.job_worker(job_id))
    if owner is not None:
        alive = await liveness.is_alive(redis, owner.decode())
        return JobState.RUNNING if alive else JobState.LOST
    taken = await taken_s_ago(redis, job_id, settings)
    if taken is not None:
        return JobState.LOST if taken > TAKE_GRACE_S else JobState.TAKEN
    if model is not None and await redis.zscore(keys.queue(model), job_id) is None:
        return JobState.LOST
    return JobState.QUEUED


async def job_lost(redis: ArqRedis, job_id: str, settings: Settings,
                   model: str | None = None) -> bool:
    """Whether the job, whose stream has not ended, never will (`job_state` is LOST)."""
    return await job_state(redis, job_id, settings, model) is JobState.LOST


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
        pipe.hdel(keys.model_prefer(model), job_id)
        pipe.delete(*keys.arq_job_keys(job_id))
        pipe.set(keys.job_cancel(job_id), cancel_value(), ex=settings.stream_ttl_s)  # stop now
        if error is not None:
            pipe.xadd(keys.stream(job_id), {"m": encode(error)})
            pipe.expire(keys.stream(job_id), settings.stream_ttl_s)
        await pipe.execute()


async def end_if_lost(redis: ArqRedis, job_id: str, model: str, settings: Settings,
                      messages: list[Delta | Final | Error]) -> None:
    """For a job read with no reader attached (an async request, a background response): if its
    stream has not ended and never will (its worker died under it), end it with `worker_lost`,
    appended to `messages` too. A reader attached to the stream does this as it waits."""
    if messages and not isinstance(messages[-1], Delta):
        return
    if await job_state(redis, job_id, settings, model=model) is JobState.LOST:
        lost = Error.of(WorkerLost("The worker running this request stopped responding; "
                                   "retry the request"))
        await withdraw(redis, job_id, model, settings, lost)
        messages.append(lost)
