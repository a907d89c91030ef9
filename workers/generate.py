"""The arq job function: run one generation job and publish its messages."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from shared import keys, metrics, store
from shared.errors import FerryError
from shared.jobs import Delta, Error, Final, GenerationJob
from workers.publish import Publisher
from workers.state import WorkerState

log = logging.getLogger(__name__)

CANCELLED = Error(status=499, message="The request was cancelled by the client", code="cancelled")


async def generate(ctx: dict[str, Any], *, job: dict[str, Any]) -> str:
    """Returns the job's outcome for arq's log and result: completed, cancelled or failed."""
    st: WorkerState = ctx["ferry"]
    gen = GenerationJob.model_validate(job)
    async with st.redis.pipeline(transaction=False) as pipe:
        pipe.exists(keys.job_cancel(gen.id))
        pipe.set(keys.job_worker(gen.id), st.worker_id, ex=int(st.settings.job_timeout_s) + 60)
        cancelled_while_queued = (await pipe.execute())[0]
    out = Publisher(st.stream_client, gen.id, st.settings.stream_ttl_s)
    answer = _Answer(out, hold_final=gen.reply is not None)
    if cancelled_while_queued:
        outcome, last = "cancelled", CANCELLED
    else:
        outcome, last = await _run(st, gen, answer)
    if gen.reply is not None:
        if outcome == "completed" and answer.final is not None:
            # Stored before `final` goes out, so a client that sees the end finds the message.
            await store.store_reply(st.redis, gen.reply, answer.text, answer.final.usage)
        elif outcome != "completed":
            await store.end_run(st.redis, gen.reply, outcome, last.model_dump() if last else None)
    if last is not None:
        await asyncio.to_thread(out.send, [last])
    log.info("job %s %s", gen.id, outcome)
    await _record(st, gen, ctx, outcome, answer)
    return outcome


async def _record(st: WorkerState, job: GenerationJob, ctx: dict[str, Any], outcome: str,
                  answer: _Answer) -> None:
    """The job's figures for /metrics; a failure here never fails the job."""
    enqueued = ctx.get("enqueue_time")
    first = answer.first_token_at
    try:
        await metrics.record_job(
            st.redis, job.model, outcome,
            answer.final.usage.completion_tokens if answer.final else 0,
            first - enqueued.timestamp() if first and enqueued else None,
            time.time() - first if first else None,
        )
    except Exception:
        log.warning("could not record metrics for job %s", job.id, exc_info=True)


async def _run(st: WorkerState, job: GenerationJob, answer: _Answer) -> tuple[str, Any]:
    st.usage.jobs_in_flight += 1
    try:
        if await st.engine.run(job, answer.emit):
            return "cancelled", CANCELLED
        return "completed", answer.final if answer.hold_final else None
    except FerryError as e:
        return "failed", Error(status=e.status, message=e.message, code=e.code, param=e.param)
    except Exception:
        log.exception("job %s failed", job.id)
        return "failed", Error(status=500, message="Generation failed on the worker")
    finally:
        st.usage.jobs_in_flight -= 1
        st.usage.last_used = time.time()


class _Answer:
    """Publishes as the engine emits; keeps choice 0's text, and holds `final` back if asked."""

    def __init__(self, out: Publisher, hold_final: bool) -> None:
        self.out = out
        self.hold_final = hold_final
        self.parts: list[str] = []
        self.final: Final | None = None
        self.first_token_at: float | None = None  # unix time

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def emit(self, messages: Sequence[Delta | Final]) -> bool:
        if self.first_token_at is None and isinstance(messages[0], Delta):
            self.first_token_at = time.time()
        self.parts.extend(m.text for m in messages if isinstance(m, Delta) and m.index == 0)
        if isinstance(messages[-1], Final):
            self.final = messages[-1]
            if self.hold_final:
                messages = messages[:-1]
        return self.out.send(messages)
