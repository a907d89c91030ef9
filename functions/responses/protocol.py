"""What `POST /v1/responses` takes: the request, its tools and its text format, and the job it
becomes (a chat job: input items become chat messages, `instructions` the system prompt).

Unknown parameters are refused, as OpenAI refuses them. Parameters that clients send routinely
but that mean nothing here are accepted and not applied: `reasoning` (models that do not reason),
`include` values for tools Ferry never runs, `service_tier`, `safety_identifier`, `stream_options`
and Codex's `client_metadata`. `prompt_cache_key` names a session: with several workers, its
requests go where its cache is.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from functions.responses.items import chat_messages, input_items
from shared.errors import InvalidRequest
from shared.jobs import GenerationJob, Sampling, Tools
from shared.storage.objects import check_metadata

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Tools that OpenAI runs on its side, or the client in its own way: accepted, never offered.
UNOFFERED = {"web_search", "web_search_preview", "web_search_2025_08_26",
             "web_search_preview_2025_03_11", "file_search", "custom", "computer",
             "computer_use_preview", "code_interpreter", "image_generation", "mcp", "local_shell",
             "shell", "apply_patch", "tool_search"}
INCLUDABLE = {"reasoning.encrypted_content", "file_search_call.results", "web_search_call.results",
              "web_search_call.action.sources", "code_interpreter_call.outputs",
              "computer_call_output.output.image_url", "message.input_image.image_url"}


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("text.format.schema is required when the type is json_schema")
        return self


class TextSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat = Field(default_factory=lambda: TextFormat.model_validate({}))
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted, not applied


class CreateResponse(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    text: TextSettings = TextSettings()
    tools: list[dict[str, Any]] = Field([], max_length=128)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    store: bool = True
    previous_response_id: str | None = None
    background: bool = False
    stream: bool = False
    metadata: dict[str, str] | None = None
    include: list[str] = []
    truncation: Literal["auto", "disabled"] = "disabled"
    user: str | None = None
    # Accepted, not applied (see the module's docstring)
    reasoning: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    stream_options: dict[str, Any] | None = None
    client_metadata: dict[str, Any] | None = None
    # Refused unless they ask for nothing
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_tool_calls: int | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(v)

    @model_validator(mode="after")
    def _consistent(self) -> CreateResponse:
        if self.input == "" or self.input == []:
            raise InvalidRequest("input must not be empty", param="input")
        if self.background and not self.store:
            raise InvalidRequest("background requires store to be true", param="background")
        if self.top_logprobs:
            raise InvalidRequest("top_logprobs is not supported on /v1/responses; use "
                                 "/v1/chat/completions with logprobs", param="top_logprobs")
        if self.max_tool_calls is not None:
            raise InvalidRequest("max_tool_calls is not supported", param="max_tool_calls")
        for i, value in enumerate(self.include):
            if value not in INCLUDABLE:
                raise InvalidRequest(f"include value {value!r} is not supported",
                                     param=f"include[{i}]")
        if self.tool_set() is not None and self.text.format.type != "text":
            raise InvalidRequest("text.format cannot hold together with tools (an answer is "
                                 "either a call or that format); use tool_choice none, or a tool "
                                 "whose parameters are the format", param="text.format")
        return self

    def items(self) -> list[dict[str, Any]]:
        """This request's input as stored items, each with its id."""
        return input_items(self.input)

    def tool_set(self) -> Tools | None:
        return tools_for_job(self.tools, self.tool_choice, self.parallel_tool_calls)

    def echo(self) -> dict[str, Any]:
        """The settings a response object shows back."""
        return {
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p,
            "text": self.text.model_dump(by_alias=True, exclude_none=True),
            "tools": self.tools, "tool_choice": self.tool_choice,
            "parallel_tool_calls": self.parallel_tool_calls, "store": self.store,
            "background": self.background, "previous_response_id": self.previous_response_id,
            "metadata": self.metadata or {}, "truncation": self.truncation, "user": self.user,
            "prompt_cache_key": self.prompt_cache_key,
            "reasoning": {"effort": (self.reasoning or {}).get("effort"),
                          "summary": (self.reasoning or {}).get("summary")},
        }

    def to_job(self, model: str, items: list[dict[str, Any]], job_id: str | None = None
               ) -> GenerationJob:
        """`items`: everything the model reads after the instructions: the chain of earlier
        responses (their input and output), then this request's input."""
        fmt = self.text.format
        return GenerationJob(
            id=job_id or uuid.uuid4().hex,
            model=model,
            kind="chat",
            messages=chat_messages(self.instructions, items),
            sampling=Sampling(max_tokens=self.max_output_tokens, temperature=self.temperature,
                              top_p=self.top_p),
            json_schema=fmt.schema_ or {} if fmt.type == "json_schema"
            else {} if fmt.type == "json_object" else None,
            tools=self.tool_set(),
            truncate=self.truncation == "auto",
            session=self.prompt_cache_key,
        )


class InputTokensRequest(BaseModel):
    """`POST /v1/responses/input_tokens`: what a response to this request would read."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] = Field([], max_length=128)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    text: TextSettings = TextSettings()
    truncation: Literal["auto", "disabled"] = "disabled"
    reasoning: dict[str, Any] | None = None
    conversation: None = None


def function_names(tools: list[dict[str, Any]]) -> dict[str, tuple[str | None, str]]:
    """The functions the tools offer, by the name the model calls: `namespace.name` for a
    namespace tool's functions -> (namespace, name)."""
    return {full: (ns, name) for full, ns, name, _ in _functions(tools)}


def tools_for_job(tools: list[dict[str, Any]], choice: str | dict[str, Any], parallel: bool
                  ) -> Tools | None:
    """The job's tools, checked: None when no function is offered (or tool_choice is none)."""
    functions = [f for _, _, _, f in _functions(tools)]
    names = [f["name"] for f in functions]
    if len(set(names)) < len(names):
        raise InvalidRequest("Tool names must be unique", param="tools")
    forced = None
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise InvalidRequest(f"tool_choice type {choice.get('type')!r} is not supported: "
                                 "Ferry offers function tools only", param="tool_choice")
        name = choice.get("name")
        if choice.get("namespace"):
            name = f"{choice['namespace']}.{name}"
        if name not in names:
            raise InvalidRequest(f"tool_choice names {name!r}, which is not in tools",
                                 param="tool_choice")
        forced = name
    elif choice not in ("none", "auto", "required"):
        raise InvalidRequest(f"Unknown tool_choice {choice!r}", param="tool_choice")
    if not functions:
        if choice == "required":
            raise InvalidRequest("tool_choice required needs a function tool", param="tool_choice")
        return None
    if choice == "none":
        return None
    return Tools(functions=functions, choice="required" if choice == "required" else "auto",
                 forced=forced, parallel=parallel)


def _functions(tools: list[dict[str, Any]]) -> list[tuple[str, str | None, str, dict[str, Any]]]:
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind == "function":
            out.append(_function(tool, None, f"tools[{i}]"))
        elif kind == "namespace":
            ns = tool.get("name")
            if not isinstance(ns, str) or not NAME.match(ns):
                raise InvalidRequest("A namespace tool needs a name of letters, digits, _ or -",
                                     param=f"tools[{i}].name")
            for j, inner in enumerate(tool.get("tools") or []):
                if inner.get("type", "function") == "function":
                    out.append(_function(inner, ns, f"tools[{i}].tools[{j}]"))
                elif inner.get("type") not in UNOFFERED:
                    raise InvalidRequest(f"Unknown tool type {inner.get('type')!r}",
                                         param=f"tools[{i}].tools[{j}].type")
        elif kind not in UNOFFERED:
            raise InvalidRequest(f"Unknown tool type {kind!r}", param=f"tools[{i}].type")
    return out


def _function(tool: dict[str, Any], ns: str | None, where: str
              ) -> tuple[str, str | None, str, dict[str, Any]]:
    name = tool.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidRequest("A function tool needs a name of 1-64 letters, digits, _ or -",
                             param=f"{where}.name")
    params = tool.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidRequest("parameters must be a JSON schema object", param=f"{where}.parameters")
    full = f"{ns}.{name}" if ns else name
    spec = {"name": full, "description": tool.get("description"), "parameters": params}
    return full, ns, name, {k: v for k, v in spec.items() if v is not None}
