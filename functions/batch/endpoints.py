"""What each endpoint a batch may target does with a line: the job its body becomes, and the
answer its job's messages render as (what the same request would have answered)."""

from __future__ import annotations

from typing import Any

from functions.openai import embeddings
from functions.openai.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from functions.openai.render import Renderer
from functions.queue.submit import JobMeta
from functions.responses.events import ResponseEvents
from functions.responses.protocol import CreateResponse
from functions.responses.stored import ResponseRecord
from shared.errors import InvalidRequest
from shared.jobs import Delta, EmbeddingJob, Final, GenerationJob
from shared.registry import models as records

Request = ChatCompletionRequest | CompletionRequest | CreateResponse | EmbeddingRequest


def embeds(endpoint: str) -> bool:
    """Whether the endpoint's lines run on an embedding model (else on one that generates)."""
    return endpoint == "/v1/embeddings"


def request_of(endpoint: str, body: dict[str, Any]) -> Request:
    """The line's body as its endpoint's request (a `ValidationError` when it is not one)."""
    if embeds(endpoint):
        return EmbeddingRequest.model_validate(body)
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


def job_of(request: Request, model: records.ModelRecord) -> GenerationJob | EmbeddingJob:
    if isinstance(request, EmbeddingRequest):
        embeddings.check_dimensions(request, model)
        return request.to_job(model.id)
    if isinstance(request, CreateResponse):
        return request.to_job(model.id, request.items())
    return request.to_job(model.id)


def answer(endpoint: str, body: dict[str, Any], meta: JobMeta, deltas: list[Delta],
           final: Final) -> dict[str, Any]:
    usage = final.usage
    if embeds(endpoint):
        return embeddings.answer(final, meta.model, EmbeddingRequest.model_validate(body).encoding_format)
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
    if "completion_tokens" not in u and "input_tokens" not in u:  # embeddings
        return u["prompt_tokens"], 0, 0
    if "input_tokens" in u:
        return u["input_tokens"], u["output_tokens"], u["input_tokens_details"]["cached_tokens"]
    return u["prompt_tokens"], u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"]
