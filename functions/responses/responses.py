"""`/responses`: create (stream, wait, or in the background), retrieve (or resume its stream),
cancel, delete, its input items, and counting input tokens.

A response is a chat job under OpenAI's Responses API: request → job on the model's queue →
worker → the job's stream, rendered as a response object or its events (`events`). A stored
response (`store`, the default) keeps its record and its job's stream in Redis, so any web process
can answer for it, resume its events, or chain on it with `previous_response_id`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from quart import Blueprint, Response

from functions.context import caller, state
from functions.http import sse
from functions.http.body import invalid, parse_body, parse_query
from functions.http.openapi import STREAM, operation
from functions.http.sse import Event
from functions.queue.handle import (
    JobState,
    call_off_cancel,
    end_if_lost,
    job_state,
    request_cancel,
    withdraw,
)
from functions.queue.reader import JobStream, count_prompt, has_ended, read_all
from functions.queue.submit import JobMeta, submit
from functions.responses import answers as a
from functions.responses import stored
from functions.responses.events import ResponseEvents
from functions.responses.protocol import CreateResponse, InputTokensRequest
from functions.responses.stored import ResponseRecord
from shared import keys
from shared.errors import Cancelled, FerryError, InvalidRequest, NotFound
from shared.jobs import Delta, Error, Final
from shared.registry import models

bp = Blueprint("responses", __name__)

CANCEL_WAIT_S = 3.0  # how long a cancel waits to answer with the cancelled response


class RetrieveParams(BaseModel):
    stream: bool = False
    starting_after: int = Field(-1, ge=-1)
    include: list[str] | str | None = None  # accepted: nothing here has more to include
    include_obfuscation: bool | None = None


class ItemsParams(BaseModel):
    limit: int = Field(20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None
    include: list[str] | str | None = None


@bp.post("/responses")
@operation("Create a response", body=CreateResponse, response=a.Response, media=STREAM)
async def create() -> Any:
    st = state()
    req = await parse_body(CreateResponse)
    owner = caller()
    model = await models.get_or_bundled(st.redis, req.model or st.settings.default_model,
                                       st.settings.models_path)
    context = await _chain(req.previous_response_id, owner)
    items = req.items()
    job = req.to_job(model.id, context + items)
    record = ResponseRecord(id=f"resp_{job.id}", job_id=job.id, owner=owner,
                            created_at=int(time.time()), model=model.id, settings=req.echo(),
                            context=context, input=items)
    if req.store:
        job.keep_s = st.settings.responses_ttl_s
        await stored.save(st.redis, record, st.settings.responses_ttl_s)
    meta = JobMeta(id=job.id, kind=job.kind, model=model.id, created=record.created_at,
                   detached=req.background)
    await submit(st.redis, job, meta, st.settings)
    if req.background and not req.stream:
        return ResponseEvents(record).snapshot("queued")
    stream = JobStream(st.redis, st.streams, job.id, model.id, st.settings,
                       cancel_on_exit=not req.background)
    if req.stream:
        return await _events(record, stream, after=-1, http_errors=True)
    events = ResponseEvents(record)
    async with stream:
        for item in [item async for item in stream if item is not None]:
            events.feed(item[1])
    assert stream.final is not None
    result = events.finish(stream.final.usage)[-1]["response"]
    await _keep(record, result)
    return result


@bp.post("/responses/input_tokens")
@operation("Count the input tokens a response would read", body=InputTokensRequest,
           response=a.InputTokens)
async def input_tokens() -> Any:
    st = state()
    req = await parse_body(InputTokensRequest)
    try:
        body = CreateResponse.model_validate({**req.model_dump(exclude_unset=True, by_alias=True),
                                              "store": False})
    except ValidationError as e:
        raise invalid(e) from e
    model = await models.get_or_bundled(st.redis, req.model or st.settings.default_model,
                                       st.settings.models_path)
    context = await _chain(req.previous_response_id, caller())
    job = body.to_job(model.id, context + body.items())
    job.count_only = True
    return {"object": "response.input_tokens",
            "input_tokens": await count_prompt(st.redis, st.streams, job, st.settings)}


@bp.get("/responses/<response_id>")
@operation("Get a response, or resume its events (stream, starting_after)",
           query=RetrieveParams, response=a.Response, media=STREAM)
async def retrieve(response_id: str) -> Any:
    st = state()
    params = parse_query(RetrieveParams)
    record = await stored.load(st.redis, response_id, caller())
    if not params.stream:
        return await current(record)
    if not await st.redis.exists(keys.stream(record.job_id)) and \
            await st.redis.zscore(keys.queue(record.model), record.job_id) is None:
        raise NotFound(f"The events of response '{record.id}' are no longer kept",
                       code="stream_not_found")
    await call_off_cancel(st.redis, record.job_id)
    stream = JobStream(st.redis, st.streams, record.job_id, record.model, st.settings,
                       cancel_on_exit=False)
    return await _events(record, stream, after=params.starting_after, http_errors=False)


@bp.post("/responses/<response_id>/cancel")
@operation("Cancel a background response", response=a.Response)
async def cancel(response_id: str) -> Any:
    st = state()
    record = await stored.load(st.redis, response_id, caller())
    if not record.settings.get("background"):
        raise InvalidRequest("Only responses created with background set to true can be "
                             "cancelled", param="response_id")
    response = await current(record)
    if response["status"] not in ("queued", "in_progress"):
        return response
    await _stop(record, "The response was cancelled")
    return await current(record)


@bp.delete("/responses/<response_id>")
@operation("Delete a stored response", response=a.Deleted)
async def delete(response_id: str) -> Any:
    st = state()
    record = await stored.load(st.redis, response_id, caller())
    if (await current(record))["status"] in ("queued", "in_progress"):
        await _stop(record, "The response was deleted")  # or its worker writes it again
    await stored.delete(st.redis, record)
    return {"id": record.id, "object": "response", "deleted": True}


@bp.get("/responses/<response_id>/input_items")
@operation("List the items a response read", query=ItemsParams, response=a.InputItemPage)
async def input_items(response_id: str) -> Any:
    params = parse_query(ItemsParams)
    record = await stored.load(state().redis, response_id, caller())
    items = record.context + record.input
    if params.order == "desc":
        items = items[::-1]
    if params.after is not None:
        at = next((i for i, it in enumerate(items) if it.get("id") == params.after), None)
        if at is None:
            raise InvalidRequest(f"No input item '{params.after}' in this response", param="after")
        items = items[at + 1:]
    page = items[:params.limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page)}


async def current(record: ResponseRecord) -> dict[str, Any]:
    """The response as it stands: finished (and then kept), or queued / in progress with the
    output so far. A job whose worker died is ended here as failed."""
    st = state()
    if record.result is not None:
        return record.result
    messages = await read_all(st.redis, record.job_id)
    await end_if_lost(st.redis, record.job_id, record.model, st.settings, messages)
    events = ResponseEvents(record)
    for m in messages:
        if isinstance(m, Delta):
            events.feed(m)
    end = messages[-1] if messages else None
    if isinstance(end, Final):
        result = events.finish(end.usage)[-1]["response"]
    elif isinstance(end, Error):
        result = events.fail(end.exception())[-1]["response"]
    else:
        started = messages or await st.redis.exists(keys.job_worker(record.job_id))
        return events.snapshot("in_progress" if started else "queued")
    await _keep(record, result)
    return result


async def _stop(record: ResponseRecord, why: str) -> None:
    """Stop the response's job, and wait a little for its stream to say so."""
    st = state()
    if await job_state(st.redis, record.job_id, st.settings) is JobState.QUEUED:
        await withdraw(st.redis, record.job_id, record.model, st.settings,
                       Error.of(Cancelled(why)))
        return
    await request_cancel(st.redis, record.job_id, st.settings)
    deadline = time.monotonic() + CANCEL_WAIT_S
    while not await has_ended(st.redis, record.job_id) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _chain(previous_id: str | None, owner: str) -> list[dict[str, Any]]:
    """The items a response chained on `previous_id` reads first: that response's own chain,
    its input, and its output."""
    if previous_id is None:
        return []
    try:
        previous = await stored.load(state().redis, previous_id, owner,
                                     param="previous_response_id")
    except NotFound as e:  # a bad parameter of this request, as OpenAI answers it
        raise InvalidRequest(f"Previous response with id '{previous_id}' not found.",
                             param="previous_response_id", code="previous_response_not_found"
                             ) from e
    response = await current(previous)
    if response["status"] in ("queued", "in_progress"):
        raise InvalidRequest(f"Previous response '{previous_id}' has not finished yet",
                             param="previous_response_id")
    return previous.context + previous.input + list(response["output"])


async def _keep(record: ResponseRecord, result: dict[str, Any], redis: Any = None) -> None:
    """Keep a stored response's result; `redis` where no app context is (a stream's body)."""
    if record.settings.get("store"):
        await stored.save_result(redis or state().redis, record, result)


async def _events(record: ResponseRecord, stream: JobStream, after: int, http_errors: bool
                  ) -> Response:
    """The response's events after `after`. `http_errors`: a failure before the first token is
    a plain HTTP error (a new request), else a `response.failed` event (a resumed one)."""
    events = ResponseEvents(record)
    redis = state().redis

    def frames(batch: list[dict[str, Any]]) -> list[Event] | None:
        return [Event(e, name=e["type"]) for e in batch if e["sequence_number"] > after] or None

    async def source() -> AsyncIterator[list[Event] | None]:
        started = False
        async with stream:
            try:
                async for batch in stream.batches():
                    if batch is None:
                        yield None
                        continue
                    out = [] if started else events.start()
                    started = True
                    for _, delta in batch:
                        out += events.feed(delta)
                    yield frames(out)
                assert stream.final is not None
                end = ([] if started else events.start()) + events.finish(stream.final.usage)
            except FerryError as e:
                if http_errors and not started:
                    raise
                end = ([] if started else events.start()) + events.fail(e)
        await _keep(record, end[-1]["response"], redis)
        yield frames(end) or []

    return await sse.respond_after_first(source(), state().settings.keepalive_s, done=None,
                                         error_name="error")
