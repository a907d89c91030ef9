"""The arq job function: run one generation job and publish its messages."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from shared import keys, telemetry
from shared.errors import FerryError
from shared.jobs import Error, GenerationJob, is_cancelled
from shared.storage import store
from workers.loaded_model import WorkerState
from workers.publish import Answer

log = logging.getLogger(__name__)

CANCELLED = Error(status=499, message="The request was cancelled by the client", code="cancelled")
STOPPING = Error(status=503, message="The worker is shutting down; retry the request",
                 code="worker_stopping")


async def generate(ctx: dict[str, Any], *, job: dict[str, Any]) -> str:
    """Returns the job's outcome for arq's log and result: completed, cancelled or failed."""
    st: WorkerState = ctx["ferry"]
    gen = GenerationJob.model_validate(job)
    async with st.redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.job_cancel(gen.id))
        pipe.set(keys.job_worker(gen.id), st.worker_id, ex=int(st.settings.job_timeout_s) + 60)
        cancelled_while_queued = is_cancelled((await pipe.execute())[0])
    answer = Answer(gen.id, hold_final=gen.reply is not None, loop=asyncio.get_running_loop(),
                    keep_s=gen.keep_s)
    if cancelled_while_queued:
        outcome, last = "cancelled", CANCELLED
    elif st.stopping:  # taken from the queue just as the drain ran out
        outcome, last = "failed", STOPPING
    else:
        outcome, last = await _run(st, gen, answer)
    if gen.reply is not None:
        if outcome == "completed" and answer.final is not None:
            # Stored before `final` goes out, so a client that sees the end finds the message.
            if answer.tool_calls and gen.reply.run_id and answer.finish_reason == "length":
                await store.end_run(st.redis, gen.reply, "incomplete", None)  # a call cut short
            elif answer.tool_calls and gen.reply.run_id:
                await store.require_action(st.redis, gen.reply, answer.text, answer.tool_calls)
            else:
                await store.store_reply(st.redis, gen.reply, answer.text, answer.final.usage)
        elif outcome != "completed":
            await store.end_run(st.redis, gen.reply, outcome, last.model_dump() if last else None)
    if last is not None:
        await asyncio.to_thread(st.publisher.send, answer, [last])
    log.info("job %s %s", gen.id, outcome)
    await _record(st, gen, ctx, outcome, answer)
    return outcome


async def _record(st: WorkerState, job: GenerationJob, ctx: dict[str, Any], outcome: str,
                  answer: Answer) -> None:
    """The job's figures for /metrics; a failure here never fails the job."""
    enqueued = ctx.get("enqueue_time")
    first = answer.first_token_at
    try:
        await telemetry.record_job(
            st.redis, job.model, outcome,
            answer.final.usage.completion_tokens if answer.final else 0,
            first - enqueued.timestamp() if first and enqueued else None,
            time.time() - first if first else None,
        )
    except Exception:
        log.warning("could not record metrics for job %s", job.id, exc_info=True)


async def _run(st: WorkerState, job: GenerationJob, answer: Answer) -> tuple[str, Any]:
    st.usage.jobs_in_flight += 1
    st.answers.add(answer)
    try:
        if await st.engine.run(job, answer):
            return ("failed", STOPPING) if st.stopping else ("cancelled", CANCELLED)
        return "completed", answer.final if answer.hold_final else None
    except FerryError as e:
        return "failed", Error(status=e.status, message=e.message, code=e.code, param=e.param)
    except Exception:
        log.exception("job %s failed", job.id)
        return "failed", Error(status=500, message="Generation failed on the worker")
    finally:
        st.answers.discard(answer)
        st.usage.jobs_in_flight -= 1
        st.usage.last_used = time.time()
