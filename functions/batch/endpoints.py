"""What each endpoint a batch may target does with a line: the job its body becomes, and the
answer its job's messages render as (what the same request would have answered)."""

from __future__ import annotations

from typing import Any

from functions.openai.protocol import ChatCompletionRequest, CompletionRequest
from functions.openai.render import Renderer
from functions.queue.submit import JobMeta
from functions.responses.events import ResponseEvents
from functions.responses.protocol import CreateResponse
from functions.responses.stored import ResponseRecord
from shared.errors import InvalidRequest
from shared.jobs import Delta, GenerationJob, Usage


def request_of(endpoint: str, body: dict[str, Any]
               ) -> ChatCompletionRequest | CompletionRequest | CreateResponse:
    """The line's body as its endpoint's request (a `ValidationError` when it is not one)."""
    if endpoint == "/v1/responses":
        request = CreateResponse.model_validate(body)
        if request.previous_response_id or request.background:
            raise InvalidRequest("A batch line cannot chain on a stored response or run in the "
                                 "background", param="body.previous_response_id"
                                 if request.previous_response_id else "body.background")
        return request
    if endpoint == "/v1/chat/completions":
        return ChatCompletionRequest.model_validate(body)
    return CompletionRequest.model_validate(body)


def job_of(request: ChatCompletionRequest | CompletionRequest | CreateResponse, model: str
           ) -> GenerationJob:
    if isinstance(request, CreateResponse):
        return request.to_job(model, request.items())
    return request.to_job(model)


def answer(endpoint: str, body: dict[str, Any], meta: JobMeta, deltas: list[Delta],
           usage: Usage) -> dict[str, Any]:
    if endpoint != "/v1/responses":
        return Renderer(meta).response(deltas, usage, meta.choices)
    request = CreateResponse.model_validate(body)
    record = ResponseRecord(id=f"resp_{meta.id}", job_id=meta.id, owner="",
                            created_at=meta.created, model=meta.model,
                            settings=request.echo() | {"store": False})
    events = ResponseEvents(record)
    for d in deltas:
        events.feed(d)
    return events.finish(usage)[-1]["response"]


def usage_of(body: dict[str, Any]) -> tuple[int, int, int]:
    """(prompt, output, cached) tokens of a line's answer, whichever API shaped it."""
    u = body["usage"]
    if "input_tokens" in u:
        return u["input_tokens"], u["output_tokens"], u["input_tokens_details"]["cached_tokens"]
    return u["prompt_tokens"], u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"]
