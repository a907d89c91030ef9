"""The objects Ferry answers `/v1/responses` with: a response, its output items, its usage, and
the events of its stream, as OpenAI's Responses API shapes them.

`functions.responses.events` builds them from a job's messages; the OpenAPI document shows the
same models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["completed", "incomplete", "queued", "in_progress", "cancelled", "failed"]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class MessageItem(BaseModel):
    id: str
    type: Literal["message"] = "message"
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str
    name: str
    arguments: str = Field(description="JSON text of the arguments, as the model wrote them")
    namespace: str | None = Field(None, description="The namespace tool the function is from")


OutputItem = MessageItem | FunctionCallItem


class InputTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV the prefix cache held")


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class Reasoning(BaseModel):
    effort: str | None = None
    summary: str | None = None


class Response(BaseModel):
    """A response: the request's settings echoed, its status, and what it produced so far."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Status
    background: bool
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: int | None = None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    prompt_cache_key: str | None = None
    reasoning: Reasoning
    service_tier: str = "default"
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_logprobs: int = 0
    top_p: float
    truncation: Literal["auto", "disabled"]
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = {}


class Deleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool


class InputTokens(BaseModel):
    object: Literal["response.input_tokens"] = "response.input_tokens"
    input_tokens: int


class InputItemPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]] = Field(description="Input items: messages, function calls and "
                                       "their outputs, each with its id")
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
