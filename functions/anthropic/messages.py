"""`/messages` and `/messages/count_tokens`: Anthropic's Messages API, validate → enqueue →
stream or answer, with its own events and error shape (`functions.anthropic.errors`).

Served with or without `?beta=true`; any `anthropic-version` and `anthropic-beta` header is
accepted. Stateless: nothing is stored.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from quart import Blueprint, Response

from functions.anthropic import answers as a
from functions.anthropic.errors import body as error_body
from functions.anthropic.protocol import CountTokensRequest, MessagesRequest
from functions.anthropic.render import MessageEvents
from functions.context import state
from functions.http import sse
from functions.http.body import parse_body
from functions.http.openapi import STREAM, operation
from functions.http.sse import Event
from functions.queue.reader import JobStream, count_prompt
from functions.queue.submit import JobMeta, submit
from shared.errors import FerryError
from shared.registry import models

bp = Blueprint("anthropic", __name__)


@bp.post("/messages")
@operation("Create a message (Anthropic's Messages API)", body=MessagesRequest,
           response=a.Message, media=STREAM, errors=a.Error)
async def create() -> Any:
    st = state()
    req = await parse_body(MessagesRequest)
    model = await models.get_or_bundled(st.redis, req.model or st.settings.default_model,
                                       st.settings.models_path)
    job = req.to_job(model.id)
    await submit(st.redis, job, JobMeta(id=job.id, kind=job.kind, model=model.id,
                                        created=int(time.time())), st.settings)
    stream = JobStream(st.redis, st.streams, job.id, model.id, st.settings)
    events = MessageEvents(job.id, model.id, req.stop_sequences)
    if req.stream:
        return await _stream(stream, events)
    async with stream:
        async for item in stream:
            if item is not None:
                events.feed(item[1])
    assert stream.final is not None
    return events.whole(stream.final.usage)


@bp.post("/messages/count_tokens")
@operation("Count a message request's input tokens", body=CountTokensRequest,
           response=a.TokenCount, errors=a.Error)
async def count_tokens() -> Any:
    st = state()
    req = await parse_body(CountTokensRequest)
    model = await models.get_or_bundled(st.redis, req.model or st.settings.default_model,
                                       st.settings.models_path)
    job = req.job(model.id, count_only=True)
    return {"input_tokens": await count_prompt(st.redis, st.streams, job, st.settings)}


async def _stream(stream: JobStream, events: MessageEvents) -> Response:
    """Events named by their type; a failure before the first token stays a plain HTTP error,
    one after it an `error` event; idle, a `ping` event."""
    keepalive_s = state().settings.keepalive_s

    def frames(batch: list[dict[str, Any]]) -> list[Event]:
        return [Event(e, name=e["type"]) for e in batch]

    async def source() -> AsyncIterator[list[Event] | None]:
        last = time.monotonic()
        async with stream:
            try:
                async for batch in stream.batches():
                    if batch is None:
                        if events.started and time.monotonic() - last >= keepalive_s:
                            last = time.monotonic()
                            yield frames([{"type": "ping"}])
                        else:
                            yield None
                        continue
                    last = time.monotonic()
                    yield frames([e for _, d in batch for e in events.feed(d)])
            except FerryError as e:
                if not events.started:
                    raise
                yield [Event(error_body(e), name="error")]
                return
        assert stream.final is not None
        yield frames(events.end(stream.final.usage))

    return await sse.respond_after_first(source(), keepalive_s, done=None, error_name="error")
