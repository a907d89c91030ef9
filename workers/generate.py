"""The arq job function: run one generation job and publish its messages."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from shared import keys, telemetry
from shared.errors import Cancelled, FerryError, InvalidRequest, WorkerStopping
from shared.fleet import cache_map
from shared.jobs import Error, Final, GenerationJob, Usage, is_cancelled
from shared.storage import store
from workers.engine.embedder import Embedder
from workers.engine.engine import Engine
from workers.engine.task import Outcome
from workers.loaded_model import LoadedModel
from workers.publish import JobOutput

log = logging.getLogger(__name__)

CANCELLED = Error.of(Cancelled("The request was cancelled by the client"))
STOPPING = Error.of(WorkerStopping("The worker is shutting down; retry the request"))
GENERATION_FAILED = Error.of(FerryError("Generation failed on the worker"))


async def generate(ctx: dict[str, Any], *, job: dict[str, Any]) -> str:
    """Returns the job's outcome for arq's log and result: completed, cancelled or failed."""
    loaded: LoadedModel = ctx["ferry"]
    gen = GenerationJob.model_validate(job)
    try:
        cancelled_while_queued = await claim(loaded, gen.id, cache_map.job_entries(gen))
        return await _generate(loaded, gen, ctx, cancelled_while_queued)
    finally:
        await release(loaded, gen.id)


async def _generate(loaded: LoadedModel, gen: GenerationJob, ctx: dict[str, Any],
                    cancelled_while_queued: bool) -> str:
    output = JobOutput(gen.id, hold_final=gen.reply is not None, loop=asyncio.get_running_loop(),
                       keep_s=gen.keep_s)
    last: Error | Final | None
    if cancelled_while_queued:
        outcome, last = "cancelled", CANCELLED
    elif loaded.stopping:  # taken from the queue just as the drain ran out
        outcome, last = "failed", STOPPING
    elif isinstance(loaded.engine, Embedder):
        outcome, last = "failed", Error.of(InvalidRequest(
            f"'{gen.model}' is an embedding model: it serves /v1/embeddings only", param="model",
            code="model_not_supported"))
    elif gen.count_only:
        outcome, last = await _count(loaded, gen)
    else:
        outcome, last = await _run(loaded, gen, output)
    if gen.reply is not None:
        if outcome == "completed" and output.final is not None:
            # Stored before `final` goes out, so a client that sees the end finds the message.
            if output.tool_calls and gen.reply.run_id and output.finish_reason == "length":
                await store.end_run(loaded.redis, gen.reply, "incomplete", None)  # a call cut short
            elif output.tool_calls and gen.reply.run_id:
                await store.require_action(loaded.redis, gen.reply, output.text, output.tool_calls)
            else:
                await store.store_reply(loaded.redis, gen.reply, output.text, output.final.usage)
        elif outcome != "completed":
            await store.end_run(loaded.redis, gen.reply, outcome, last.model_dump() if last else None)
    if last is not None:
        await asyncio.to_thread(loaded.publisher.send, output, [last])
    if gen.notify:
        await notify(loaded, gen.notify, gen.id, gen.keep_s)
    log.info("job %s %s", gen.id, outcome)
    await _record(loaded, gen, ctx, outcome, output)
    return outcome


async def notify(loaded: LoadedModel, key: str, job_id: str, keep_s: int | None) -> None:
    """The job's stream has ended: say so on the list `key`. A notice lost here is found by the
    driver's own look."""
    try:
        async with loaded.redis.pipeline(transaction=False) as pipe:
            say_ended(pipe, loaded, key, job_id, keep_s)
            await pipe.execute()
    except Exception:
        log.warning("could not say that job %s ended", job_id, exc_info=True)


def say_ended(pipe: Any, loaded: LoadedModel, key: str, job_id: str, keep_s: int | None) -> None:
    """Add to `pipe` the job's id on its `notify` list (a batch's driver pops it at its next
    tick instead of reading every line's stream), kept as long as the job's stream."""
    pipe.rpush(key, job_id)
    pipe.expire(key, keep_s or loaded.settings.stream_ttl_s)


async def claim(loaded: LoadedModel, job_id: str, entries: list[str] | None = None) -> bool:
    """Record this worker as the job's owner (readers watch its heartbeat from now on); whether
    the job was cancelled while it waited in the queue. A generation job (`entries`: what it puts
    in the worker's cache map) also counts in the worker's load until `release`."""
    model = loaded.usage.id
    async with loaded.redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.job_cancel(job_id))
        pipe.set(keys.job_worker(job_id), loaded.worker_id, ex=int(loaded.settings.job_timeout_s) + 60)
        if entries is not None:
            loaded.claimed[job_id] = entries
            pipe.hdel(keys.model_prefer(model), job_id)
            pipe.hset(keys.model_load(model), loaded.worker_id, str(len(loaded.claimed)))
            cache_map.add(pipe, model, loaded.worker_id, entries, loaded.settings.heartbeat_ttl_s)
        return is_cancelled((await pipe.execute())[0])


async def release(loaded: LoadedModel, job_id: str) -> None:
    """The job `claim` counted has ended: the worker's load drops (a failure to say so is
    corrected by the next job, and a dead worker's load is never read)."""
    loaded.claimed.pop(job_id, None)
    try:
        await loaded.redis.hset(keys.model_load(loaded.usage.id), loaded.worker_id,
                                str(len(loaded.claimed)))
    except Exception:
        log.warning("could not record the load of %s", loaded.usage.id, exc_info=True)


async def _record(loaded: LoadedModel, job: GenerationJob, ctx: dict[str, Any], outcome: str,
                  output: JobOutput) -> None:
    """The job's figures for /metrics; a failure here never fails the job."""
    enqueued = ctx.get("enqueue_time")
    first = output.first_token_at
    try:
        await telemetry.record_job(
            loaded.redis, job.model, outcome,
            output.final.usage.completion_tokens if output.final else 0,
            first - enqueued.timestamp() if first and enqueued else None,
            time.time() - first if first else None,
            (job.route.decision, output.final.usage.cached_tokens)
            if job.route and output.final else None,
        )
    except Exception:
        log.warning("could not record metrics for job %s", job.id, exc_info=True)


async def _count(loaded: LoadedModel, job: GenerationJob) -> tuple[str, Error | Final]:
    """A count-only job: the prompt's tokens as its usage would show them, nothing generated."""
    assert isinstance(loaded.engine, Engine)
    try:
        tokens = await asyncio.to_thread(loaded.engine.prompts.prompt_tokens, job)
    except FerryError as e:
        return "failed", Error.of(e)
    return "completed", Final(usage=Usage(prompt_tokens=tokens))


async def _run(loaded: LoadedModel, job: GenerationJob, output: JobOutput) -> tuple[str, Any]:
    assert isinstance(loaded.engine, Engine)
    loaded.usage.jobs_in_flight += 1
    loaded.outputs.add(output)
    try:
        outcome = await loaded.engine.run(job, output)
    except FerryError as e:
        return "failed", Error.of(e)
    except Exception:
        log.exception("job %s failed", job.id)
        return "failed", GENERATION_FAILED
    finally:
        loaded.outputs.discard(output)
        loaded.usage.jobs_in_flight -= 1
        loaded.usage.last_used = time.time()
    if outcome is Outcome.CANCELLED:
        return ("failed", STOPPING) if loaded.stopping else ("cancelled", CANCELLED)
    if outcome is Outcome.FAILED:
        return "failed", GENERATION_FAILED
    return "completed", output.final if output.hold_final else None
