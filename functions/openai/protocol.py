"""OpenAI request and response shapes for chat and text completions, and embeddings.

Requests validate themselves (bounds as OpenAI documents them) and build their own job with
`to_job()`. Responses are built from a job's messages by `functions.render`.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.errors import InvalidRequest
from shared.jobs import EmbeddingJob, GenerationJob, Sampling, Tools

MAX_CHOICES = 16
MAX_STOP = 16


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this is the result of

    def as_text(self) -> dict[str, Any]:
        """The message for a chat template: content flattened to one string."""
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": text}
        if self.name:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None  # arguments always match the schema here (a grammar holds them)


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def tools_for_job(tools: list[ToolDef] | None, choice: ToolChoice | str | dict[str, Any] | None,
                  parallel: bool) -> Tools | None:
    """The job's tools, checked: None when there are none to call."""
    if isinstance(choice, dict):
        choice = NamedToolChoice.model_validate(choice)
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequest("tool_choice is only allowed when tools are given",
                                 param="tool_choice")
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) < len(names):
        raise InvalidRequest("Tool names must be unique", param="tools")
    forced = None
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise InvalidRequest(f"tool_choice names '{choice.function.name}', which is not in "
                                 "tools", param="tool_choice")
        forced = choice.function.name
    elif choice == "none":
        return None
    elif choice not in (None, "auto", "required"):
        raise InvalidRequest(f"Unknown tool_choice {choice!r}", param="tool_choice")
    return Tools(functions=[t.function.model_dump(exclude_none=True) for t in tools],
                 choice="required" if choice == "required" else "auto", forced=forced,
                 parallel=parallel)


def check_tool_messages(messages: list[ChatMessage]) -> None:
    """Every tool result answers a call made earlier in the conversation."""
    calls: set[str] = set()
    for i, m in enumerate(messages):
        calls.update(c.id for c in m.tool_calls or [])
        if m.role == "tool" and m.tool_call_id not in calls:
            raise InvalidRequest(
                f"messages[{i}] is a tool result for call {m.tool_call_id!r}, which no earlier "
                "assistant message made", param=f"messages[{i}].tool_call_id")


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]  # required, as OpenAI requires it
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama.cpp's json_object form

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is json_schema")
        return self

    def schema_for_job(self) -> dict[str, Any] | None:
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.schema_ or {}
        if self.type == "json_object":
            return self.schema_ or {}
        return None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _CompletionBase(BaseModel):
    """Parameters chat and text completions share."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0, le=1)
    stop: list[str] = []
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    # llama.cpp divides positive logits by it: 0, or a tiny or huge value, makes them infinite
    repeat_penalty: float = Field(1.0, ge=0.01, le=100)
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    user: str | None = None
    # OpenAI's: requests sharing a key share a cache; here, the worker whose cache holds it
    prompt_cache_key: str | None = Field(None, max_length=1024)
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else v or []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return [s for s in stops if s]

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (v or {}).items():
            if not token.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError("logit_bias values must be between -100 and 100")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_tokens: int | None) -> Sampling:
        return Sampling(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            stop=self.stop,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            repeat_penalty=self.repeat_penalty,
            seed=self.seed,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            ignore_eos=self.ignore_eos,
        )

    def _json_schema(self) -> dict[str, Any] | None:
        return self.response_format.schema_for_job() if self.response_format else None


class ChatCompletionRequest(_CompletionBase):
    messages: list[ChatMessage] = Field(min_length=1)
    conversation: str | None = Field(None, validation_alias=AliasChoices("conversation",
                                                                         "conversation_id"))
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    functions: list[Any] | None = None  # deprecated by OpenAI: refused, see tools

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.functions is not None:
            raise InvalidRequest("functions is deprecated and not supported; use tools",
                                 param="functions")
        check_tool_messages(self.messages)
        if self.tool_set() is not None and self._json_schema() is not None:
            raise InvalidRequest("response_format cannot hold together with tools (a reply is "
                                 "either a call or that format); use tool_choice none, or a tool "
                                 "whose parameters are the format", param="response_format")
        return self

    def tool_set(self) -> Tools | None:
        return tools_for_job(self.tools, self.tool_choice, self.parallel_tool_calls)

    def to_job(self, model: str) -> GenerationJob:
        return GenerationJob(
            id=uuid.uuid4().hex,
            model=model,
            kind="chat",
            messages=[m.as_text() for m in self.messages],
            n=self.n,
            sampling=self._sampling(self.max_completion_tokens or self.max_tokens),
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            json_schema=self._json_schema(),
            tools=self.tool_set(),
            session=self.prompt_cache_key,
        )


class CompletionRequest(_CompletionBase):
    prompt: str | list[str] = Field(...)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    @model_validator(mode="after")
    def _choices_bounded(self) -> CompletionRequest:
        prompts = 1 if isinstance(self.prompt, str) else len(self.prompt)
        if prompts * self.n > MAX_CHOICES:
            raise InvalidRequest(
                f"prompts x n must be at most {MAX_CHOICES}, got {prompts * self.n}", param="n"
            )
        if self.echo:
            raise InvalidRequest("echo is not supported", param="echo")
        return self

    def to_job(self, model: str) -> GenerationJob:
        return GenerationJob(
            id=uuid.uuid4().hex,
            model=model,
            kind="text",
            prompts=[self.prompt] if isinstance(self.prompt, str) else self.prompt,
            n=self.n,
            sampling=self._sampling(self.max_tokens),
            logprobs=self.logprobs,
            json_schema=self._json_schema(),
            session=self.prompt_cache_key,
        )


def _named(model: Any) -> Any:
    """`model` may be left out (the default model), not sent as null."""
    if model is None:
        raise ValueError("model must be a string (or left out for the default model)")
    return model


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    _model = field_validator("model", mode="before")(_named)
    input: str = Field(validation_alias=AliasChoices("input", "content"))
    add_special: bool = True  # llama.cpp server's name: add BOS where the model wants it
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    _model = field_validator("model", mode="before")(_named)
    tokens: list[int]


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(BaseModel):
    """`/v1/embeddings`, as OpenAI documents it. `user` is accepted and not applied."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _some(cls, value: Any) -> Any:
        inputs = cls._inputs(value)
        if not inputs:
            raise ValueError("input cannot be an empty list")
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        if any(len(i) == 0 for i in inputs):
            raise ValueError("an input cannot be empty (no text, or no tokens)")
        return value

    @staticmethod
    def _inputs(value: Any) -> list[str | list[int]]:
        if isinstance(value, str) or (value and all(isinstance(t, int) for t in value)):
            return [value]  # one text, or one token array
        return list(value)

    def to_job(self, model: str) -> EmbeddingJob:
        return EmbeddingJob(id=uuid.uuid4().hex, model=model, inputs=self._inputs(self.input))
