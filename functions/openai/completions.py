"""`/chat/completions` and `/completions`: validate → enqueue → stream or answer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from quart import Blueprint, Response, request

from functions.assistants.conversations import record_turn
from functions.context import state
from functions.http import sse
from functions.http.body import parse_body
from functions.http.openapi import STREAM, operation
from functions.http.sse import Event
from functions.openai import answers as a
from functions.openai.protocol import ChatCompletionRequest, CompletionRequest
from functions.openai.render import Renderer
from functions.queue.handle import call_off_cancel, end_if_lost, request_cancel
from functions.queue.reader import JobStream, deltas_upto, load_meta, read_all
from functions.queue.submit import JobMeta, submit
from shared import keys
from shared.errors import NotFound
from shared.jobs import Delta, Error, Final, Reply
from shared.registry import models
from shared.storage.objects import check_id, new_id

bp = Blueprint("completions", __name__)


@bp.post("/chat/completions")
@operation("Create a chat completion", body=ChatCompletionRequest, response=a.ChatCompletion, media=STREAM)
async def chat_completions() -> Any:
    return await _complete(await parse_body(ChatCompletionRequest))


@bp.post("/completions")
@operation("Create a text completion", body=CompletionRequest, response=a.TextCompletion, media=STREAM)
async def completions() -> Any:
    return await _complete(await parse_body(CompletionRequest))


@bp.get("/chat/completions/<job_id>/stream")
@bp.get("/completions/<job_id>/stream")
@operation("Resume a completion's stream (Last-Event-ID)", media=STREAM)
async def resume(job_id: str) -> Response:
    """Replay a stream after `Last-Event-ID` (header or query), then follow it live."""
    st = state()
    job_id = _job_id(job_id)
    meta = await load_meta(st.redis, job_id, started=False)
    if not await st.redis.exists(keys.stream(job_id)) and \
            await st.redis.zscore(keys.queue(meta.model), job_id) is None:
        raise NotFound(f"No stream '{job_id}' (unknown, or no longer kept)",
                       code="stream_not_found")  # neither written nor waiting to be
    await call_off_cancel(st.redis, job_id)
    after = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0-0"
    renderer = Renderer(meta)
    for seen in await deltas_upto(st.redis, job_id, after):
        renderer.chunk(seen)
    stream = JobStream(st.redis, st.streams, job_id, meta.model, st.settings, after=after,
                       cancel_on_exit=not meta.detached)
    return await _stream(stream, renderer)


@bp.get("/chat/completions/<job_id>")
@bp.get("/completions/<job_id>")
@operation("Get a completion: the answer once finished, else its status (async requests)",
           response=a.CompletionOrStatus)
async def get(job_id: str) -> Any:
    st = state()
    job_id = _job_id(job_id)
    meta = await load_meta(st.redis, job_id, started=False)
    renderer = Renderer(meta)
    messages = await read_all(st.redis, job_id)
    await end_if_lost(st.redis, job_id, meta.model, st.settings, messages)
    if messages and isinstance(messages[-1], Final):
        return renderer.response([m for m in messages if isinstance(m, Delta)],
                                 messages[-1].usage, meta.choices)
    status: dict[str, Any] = {"id": renderer.id, "object": renderer.object, "created": meta.created,
                              "model": meta.model}
    if messages and isinstance(end := messages[-1], Error):
        return {**status, "status": "cancelled" if end.code == "cancelled" else "failed",
                **end.exception().to_dict()}
    started = messages or await st.redis.exists(keys.job_worker(job_id))
    return {**status, "status": "in_progress" if started else "queued"}


@bp.post("/chat/completions/<job_id>/cancel")
@bp.post("/completions/<job_id>/cancel")
@operation("Cancel a completion (an async request, say)", response=a.AsyncStatus)
async def cancel(job_id: str) -> Any:
    st = state()
    job_id = _job_id(job_id)
    await load_meta(st.redis, job_id, started=False)
    await request_cancel(st.redis, job_id, st.settings)
    return await get(job_id)


def _job_id(completion_id: str) -> str:
    return check_id(completion_id.removeprefix("chatcmpl-").removeprefix("cmpl-"), "id")


async def _complete(req: ChatCompletionRequest | CompletionRequest) -> Any:
    st = state()
    model = await models.get_or_bundled(st.redis, req.model or st.settings.default_model,
                                       st.settings.models_path)
    job = req.to_job(model.id)
    if isinstance(req, ChatCompletionRequest) and req.conversation:
        thread = await record_turn(req.conversation, req)
        job.reply = Reply(thread_id=thread.id, owner=thread.owner, message_id=new_id("msg"))
        job.session = job.session or thread.id
    respond_async = "respond-async" in request.headers.get("Prefer", "")
    if respond_async:  # RFC 7240: 202 now, the answer at Location when it is done
        job.keep_s = st.settings.async_ttl_s
    meta = JobMeta(
        id=job.id, kind=job.kind, model=model.id, created=int(time.time()),
        include_usage=req.stream and req.include_usage, choices=job.choice_count,
        detached=respond_async,
    )
    await submit(st.redis, job, meta, st.settings)
    if respond_async:
        renderer = Renderer(meta)
        location = f"{request.path.rstrip('/')}/{renderer.id}"
        return {"id": renderer.id, "object": renderer.object, "created": meta.created,
                "model": meta.model, "status": "queued"}, 202, {
                    "Location": location, "Preference-Applied": "respond-async"}
    stream = JobStream(st.redis, st.streams, job.id, model.id, st.settings)
    renderer = Renderer(meta)
    if req.stream:
        return await _stream(stream, renderer)
    async with stream:
        deltas = [item[1] async for item in stream if item is not None]
    assert stream.final is not None
    return renderer.response(deltas, stream.final.usage, job.choice_count)


async def _stream(stream: JobStream, renderer: Renderer) -> Response:
    """Commit to 200 only once the first chunk is in: early failures stay plain HTTP errors."""

    async def chunks() -> AsyncIterator[list[Event] | Event | None]:
        async with stream:
            async for batch in stream.batches():
                yield None if batch is None else [Event(renderer.chunk(d), id=i) for i, d in batch]
        if renderer.meta.include_usage and stream.final is not None:
            yield Event(renderer.usage_chunk(stream.final.usage))

    return await sse.respond_after_first(chunks(), state().settings.keepalive_s)

