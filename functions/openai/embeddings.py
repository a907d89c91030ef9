"""`/embeddings`: validate → enqueue → answer with the worker's vectors, in input order."""

from __future__ import annotations

import base64
import time
from typing import Any, Literal

import numpy as np
from quart import Blueprint

from functions.context import state
from functions.http.body import parse_body
from functions.http.openapi import operation
from functions.openai import answers as a
from functions.openai.protocol import EmbeddingRequest
from functions.queue.reader import JobStream
from functions.queue.submit import JobMeta, submit
from shared.errors import InvalidRequest
from shared.jobs import Final
from shared.registry import models

bp = Blueprint("embeddings", __name__)


@bp.post("/embeddings")
@operation("Create embeddings", body=EmbeddingRequest, response=a.Embeddings)
async def create() -> Any:
    st = state()
    req = await parse_body(EmbeddingRequest)
    model = await models.get_or_bundled(st.redis, req.model, st.settings.models_path, embeds=True)
    check_dimensions(req, model)
    job = req.to_job(model.id)
    meta = JobMeta(id=job.id, kind=job.kind, model=model.id, created=int(time.time()),
                   choices=job.choice_count)
    await submit(st.redis, job, meta, st.settings)
    async with JobStream(st.redis, st.streams, job.id, model.id, st.settings) as stream:
        async for _ in stream:  # an embedding job sends its final message only
            pass
    assert stream.final is not None
    return answer(stream.final, model.id, req.encoding_format)


def check_dimensions(req: EmbeddingRequest, model: models.ModelRecord) -> None:
    """Ferry returns a model's vectors whole: `dimensions` may only name their own size."""
    own = model.metadata.get("embedding_length")
    if req.dimensions is not None and req.dimensions != own:
        raise InvalidRequest(f"'{model.id}' returns {own}-dimensional vectors; dimensions "
                             f"{req.dimensions} is not supported", param="dimensions",
                             code="invalid_value")


def answer(final: Final, model: str, encoding: Literal["float", "base64"]) -> dict[str, Any]:
    """OpenAI's list of embeddings from the job's final message."""
    def vector(b64: str) -> list[float] | str:
        return b64 if encoding == "base64" else np.frombuffer(base64.b64decode(b64), "<f4").tolist()

    tokens = final.usage.prompt_tokens
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": vector(v)}
                     for i, v in enumerate(final.embeddings)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
