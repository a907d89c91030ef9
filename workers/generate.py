"""The arq job function: run one generation job and publish its messages."""

from __future__ import annotations

import logging
import threading
from contextlib import aclosing
from typing import Any

from shared import keys
from shared.errors import FerryError
from shared.jobs import Error, Final, GenerationJob
from workers.engine import Engine
from workers.publish import Publisher
from workers.state import WorkerState

log = logging.getLogger(__name__)

CANCELLED = Error(status=499, message="The request was cancelled by the client", code="cancelled")


async def generate(ctx: dict[str, Any], *, job: dict[str, Any]) -> str:
    """Returns the job's outcome for arq's log and result: completed, cancelled or failed."""
    st: WorkerState = ctx["ferry"]
    gen = GenerationJob.model_validate(job)
    out = Publisher(st.redis, gen.id, st.settings.stream_ttl_s)
    if await out.cancelled():
        return "cancelled"
    await st.redis.set(keys.job_worker(gen.id), st.info.id, ex=int(st.settings.job_timeout_s) + 60)
    st.info.jobs_in_flight += 1
    try:
        return await _run(st.engine, gen, out)
    finally:
        st.info.jobs_in_flight -= 1


async def _run(engine: Engine, job: GenerationJob, out: Publisher) -> str:
    stop = threading.Event()
    try:
        async with aclosing(engine.run(job, stop)) as batches:
            async for messages in batches:
                if await out.send(messages) and not isinstance(messages[-1], Final):
                    stop.set()  # the engine ends at the next token; closing waits for it
                    break
            else:
                return "completed"
        await out.send([CANCELLED])
        log.info("job %s cancelled by its client", job.id)
        return "cancelled"
    except FerryError as e:
        await out.send([Error(status=e.status, message=e.message, code=e.code, param=e.param)])
        return "failed"
    except Exception:
        log.exception("job %s failed", job.id)
        await out.send([Error(status=500, message="Generation failed on the worker")])
        return "failed"
