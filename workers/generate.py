"""The arq job function: run one generation job and publish its messages."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from shared import keys
from shared.errors import FerryError
from shared.jobs import Error, GenerationJob
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
        pipe.set(keys.job_worker(gen.id), st.info.id, ex=int(st.settings.job_timeout_s) + 60)
        if (await pipe.execute())[0]:
            return "cancelled"  # the client left while the job was queued
    out = Publisher(st.stream_client, gen.id, st.settings.stream_ttl_s)
    st.info.jobs_in_flight += 1
    try:
        if await st.engine.run(gen, out.send):
            outcome, last = "cancelled", CANCELLED
        else:
            return "completed"
    except FerryError as e:
        outcome, last = "failed", Error(status=e.status, message=e.message, code=e.code, param=e.param)
    except Exception:
        log.exception("job %s failed", gen.id)
        outcome, last = "failed", Error(status=500, message="Generation failed on the worker")
    finally:
        st.info.jobs_in_flight -= 1
    await asyncio.to_thread(out.send, [last])
    log.info("job %s %s: %s", gen.id, outcome, last.message)
    return outcome
