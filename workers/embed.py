"""The arq job function for `/v1/embeddings`: embed a job's inputs and publish their vectors."""

from __future__ import annotations

import logging
import time
from typing import Any

from redis.exceptions import RedisError

from shared import keys, telemetry
from shared.errors import FerryError, InvalidRequest
from shared.jobs import EmbeddingJob, Error, Final, Usage, encode, entry_id
from workers.engine.embedder import Embedder
from workers.generate import CANCELLED, STOPPING, claim, say_ended
from workers.loaded_model import LoadedModel

log = logging.getLogger(__name__)


async def embed(ctx: dict[str, Any], *, job: dict[str, Any]) -> str:
    """Returns the job's outcome for arq's log and result: completed, cancelled or failed."""
    loaded: LoadedModel = ctx["ferry"]
    request = EmbeddingJob.model_validate(job)
    cancelled = await claim(loaded, request.id)
    last: Error | Final
    if cancelled:
        outcome, last = "cancelled", CANCELLED
    elif loaded.stopping:
        outcome, last = "failed", STOPPING
    elif not isinstance(loaded.engine, Embedder):
        outcome, last = "failed", Error.of(InvalidRequest(
            f"'{request.model}' generates text; it is not an embedding model", param="model",
            code="model_not_supported"))
    else:
        outcome, last = await _embed(loaded, loaded.engine, request)
    packed = loaded.engine.take_packed() if isinstance(loaded.engine, Embedder) else []
    try:  # the answer, its stream's expiry and the job's figures: one round trip
        async with loaded.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(keys.stream(request.id), {"m": encode(last)},
                      id=entry_id(int(time.time() * 1000), 1))
            pipe.expire(keys.stream(request.id), request.keep_s or loaded.settings.stream_ttl_s)
            telemetry.record_embedding(pipe, request.model, outcome, packed)
            if request.notify:
                say_ended(pipe, loaded, request.notify, request.id, request.keep_s)
            await pipe.execute()
    except (RedisError, OSError) as e:  # the reader finds the worker alive, then the job lost
        log.warning("could not publish job %s: %s", request.id, e)
        return "failed"
    log.info("job %s %s", request.id, outcome)
    return outcome


async def _embed(loaded: LoadedModel, engine: Embedder, request: EmbeddingJob
                 ) -> tuple[str, Error | Final]:
    loaded.usage.jobs_in_flight += 1
    try:
        vectors, tokens = await engine.embed(request)
    except FerryError as e:
        return "failed", Error.of(e)
    finally:
        loaded.usage.jobs_in_flight -= 1
        loaded.usage.last_used = time.time()
    return "completed", Final(usage=Usage(prompt_tokens=tokens), embeddings=vectors)
