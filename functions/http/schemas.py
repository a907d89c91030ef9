"""The shapes of Ferry's JSON answers that have no stored model of their own, for the OpenAPI document.

Stored objects (assistants, threads, messages, runs, users, API keys) are documented by their own
models in `shared`; these cover the rest. They are checked against real answers by the
schemathesis test, which fails on any answer that does not match.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from shared.credentials.accounts import ApiKey, User

T = TypeVar("T")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer, in OpenAI's shape."""

    error: ErrorBody


class Page(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="JSON text of the arguments, as the model wrote it")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the answer is only tool calls")
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class _Choice(BaseModel):
    index: int
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatChoice(_Choice):
    message: AssistantMessage


class TextChoice(_Choice):
    text: str


class _Completion(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatCompletion(_Completion):
    """`stream: false`; with `stream: true` the answer is Server-Sent Events of chunks."""

    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class TextCompletion(_Completion):
    object: Literal["text_completion"]
    choices: list[TextChoice]


class AsyncStatus(BaseModel):
    """An async request (`Prefer: respond-async`) that is not finished, or did not finish well;
    once done, the completion object itself."""

    id: str
    object: str
    created: int
    model: str
    status: Literal["queued", "in_progress", "failed", "cancelled"]
    error: dict[str, Any] | None = None


class ModelInfo(BaseModel):
    """A registered model: Jan's model.json fields, and its state on this server."""

    id: str
    object: Literal["model"]
    name: str | None = None
    state: str | None = None
    created: int | None = None
    owned_by: str | None = None
    engine: str | None = None
    format: str | None = None
    ctx_len: int | None = None
    settings: dict[str, Any] = {}
    parameters: dict[str, Any] = {}
    metadata: dict[str, Any] = {}


class WorkerRef(BaseModel):
    id: str
    host: str
    device: str


class ModelState(BaseModel):
    """The answer to start and stop: where the model now runs (start), or that it stopped."""

    id: str
    object: Literal["model"]
    state: str
    worker: WorkerRef | None = None


class Conversation(BaseModel):
    id: str
    object: Literal["conversation"]
    title: str
    model: str | None
    created_at: int
    updated_at: int
    metadata: dict[str, str]
    assistants: list[dict[str, Any]]


class TokenPiece(BaseModel):
    id: int
    piece: str


class Tokens(BaseModel):
    tokens: list[int] | list[TokenPiece]  # with_pieces: each token with its text


class TokenCount(BaseModel):
    count: int


class Detokenized(BaseModel):
    content: str


class TokenPair(BaseModel):
    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int
    refresh_token: str


class LoggedIn(TokenPair):
    user: User


class NewKey(ApiKey):
    key: str  # the secret, shown this once


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    timestamp: str
    reason: str | None = None
    workers: dict[str, int] = {}
    persistence: str | None = None
    warning: str | None = None


class Status(BaseModel):
    api_gateway: str
    database: dict[str, Any]
    inference_model: dict[str, dict[str, Any]] = {}
    workers: list[dict[str, Any]] = []
    external_apis: dict[str, Any] = {}

