"""The objects Ferry answers OpenAI's endpoints with: completions, their stream chunks, usage.

`functions.openai.render` builds these from a job's messages, and the OpenAPI document shows the
same models, so the documented shape and the answer cannot drift apart. A field appears in the
JSON only when it was given (`dump`): a chunk's delta carries `role` in its first chunk alone, and
`usage: null` rides on every chunk only when the client asked for usage.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, RootModel

from shared.jobs import Logprobs


def dump(answer: BaseModel) -> dict[str, Any]:
    """The answer as JSON-ready data, with the fields it was built with (none left out, none
    added)."""
    return answer.model_dump(exclude_unset=True)


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


class TopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


# Completion-style logprobs (one entry per token in each list) are the stream's own.
TextLogprobs = Logprobs

class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the answer is only tool calls")
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: TextLogprobs | None = None
    finish_reason: str | None


class _Completion(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ChatCompletion(_Completion):
    """`stream: false`; with `stream: true` the answer is Server-Sent Events of chunks."""

    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class TextCompletion(_Completion):
    """`stream: false`; with `stream: true`, Server-Sent Events of these, a piece of text each."""

    object: Literal["text_completion"]
    choices: list[TextChoice]


class ChunkFunction(BaseModel):
    name: str | None = None  # in a call's first chunk only
    arguments: str


class ChunkToolCall(BaseModel):
    """A piece of a call: the first names it (`id`, `type`, `function.name`, arguments empty),
    the later ones carry `index` and an `arguments` fragment."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChunkFunction


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionChunk(_Completion):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]


class AsyncStatus(BaseModel):
    """An async request (`Prefer: respond-async`) that is not finished, or did not finish well;
    once done, the completion object itself."""

    id: str
    object: str
    created: int
    model: str
    status: Literal["queued", "in_progress", "failed", "cancelled"]
    error: dict[str, Any] | None = None


class CompletionOrStatus(RootModel[ChatCompletion | TextCompletion | AsyncStatus]):
    """`GET …/completions/{id}`: the completion once it finished, else its status."""


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


class TokenPiece(BaseModel):
    id: int
    piece: str


class Tokens(BaseModel):
    tokens: list[int] | list[TokenPiece]  # with_pieces: each token with its text


class TokenCount(BaseModel):
    count: int


class Detokenized(BaseModel):
    content: str


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # encoding_format base64: little-endian float32, base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Embeddings(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
