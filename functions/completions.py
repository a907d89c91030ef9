"""`/chat/completions` and `/completions`: validate → enqueue → stream or answer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from quart import Blueprint, Response, request

from functions import responses as r
from functions import sse
from functions.conversations import record_turn
from functions.jobs import JobMeta, JobStream, deltas_upto, load_meta, submit
from functions.openapi import STREAM, operation
from functions.render import Renderer
from functions.sse import Event
from functions.state import parse_body, state
from shared import models
from shared.jobs import Reply
from shared.objects import new_id
from shared.protocol import ChatCompletionRequest, CompletionRequest

bp = Blueprint("completions", __name__)


@bp.post("/chat/completions")
@operation("Create a chat completion", body=ChatCompletionRequest, response=r.ChatCompletion, media=STREAM)
async def chat_completions() -> Any:
    return await _complete(await parse_body(ChatCompletionRequest))


@bp.post("/completions")
@operation("Create a text completion", body=CompletionRequest, response=r.TextCompletion, media=STREAM)
async def completions() -> Any:
    return await _complete(await parse_body(CompletionRequest))


@bp.get("/chat/completions/<job_id>/stream")
@bp.get("/completions/<job_id>/stream")
@operation("Resume a completion's stream (Last-Event-ID)", media=STREAM)
async def resume(job_id: str) -> Response:
    """Replay a stream after `Last-Event-ID` (header or query), then follow it live."""
    st = state()
    job_id = job_id.removeprefix("chatcmpl-").removeprefix("cmpl-")
    meta = await load_meta(st.redis, job_id)
    after = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0-0"
    renderer = Renderer(meta)
    for seen in await deltas_upto(st.redis, job_id, after):
        renderer.chunk(seen)
    stream = JobStream(st.redis, job_id, meta.model, st.settings, after=after)
    return await _stream(stream, renderer)


async def _complete(req: ChatCompletionRequest | CompletionRequest) -> Any:
    st = state()
    model = await models.get_or_bundled(st.redis, req.model or st.settings.default_model,
                                       st.settings.models_path)
    job = req.to_job(model.id)
    if isinstance(req, ChatCompletionRequest) and req.conversation:
        thread = await record_turn(req.conversation, req)
        job.reply = Reply(thread_id=thread.id, owner=thread.owner, message_id=new_id("msg"))
    meta = JobMeta(
        id=job.id, kind=job.kind, model=model.id, created=int(time.time()),
        include_usage=req.stream and req.include_usage,
    )
    await submit(st.redis, job, meta, st.settings)
    stream = JobStream(st.redis, job.id, model.id, st.settings)
    renderer = Renderer(meta)
    if req.stream:
        return await _stream(stream, renderer)
    async with stream:
        deltas = [item[1] async for item in stream if item is not None]
    assert stream.final is not None
    return renderer.response(deltas, stream.final.usage, job.choice_count)


async def _stream(stream: JobStream, renderer: Renderer) -> Response:
    """Commit to 200 only once the first chunk is in: early failures stay plain HTTP errors."""

    async def chunks() -> AsyncIterator[Event | None]:
        async with stream:
            async for item in stream:
                yield None if item is None else Event(renderer.chunk(item[1]), id=item[0])
        if renderer.meta.include_usage and stream.final is not None:
            yield Event(renderer.usage_chunk(stream.final.usage))

    return await sse.respond_after_first(chunks(), state().settings.keepalive_s)

