"""What `POST /v1/messages` takes: Anthropic's Messages request, and the chat job it becomes.

`metadata.user_id` names a session: with several workers, its requests go where its cache is.
Accepted and not applied: the rest of `metadata`, `thinking` (no model here thinks), `context_management`,
`output_config`, `service_tier`, `speed`, `inference_geo`, `diagnostics`, `container`,
`mcp_servers`, `user_profile_id`, `workspace_id`, and `cache_control` on the request or any block
(the prefix cache needs no marks). Other unknown fields are a 400, as Anthropic answers.
Thinking blocks in the history are dropped. `max_tokens` above what the context can hold is a
ceiling, never a refusal (Claude Code asks for 32000). Claude Code's per-request
`x-anthropic-billing-header` line in the system prompt is dropped, as llama-server drops it: it
changes every request and would defeat the prefix cache.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.errors import InvalidRequest
from shared.jobs import GenerationJob, Sampling, Tools

NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
BILLING = re.compile(r"^x-anthropic-billing-header:.*$\n?", re.MULTILINE)
DROPPED = {"thinking", "redacted_thinking"}


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control, type "custom", ...

    name: str = Field(pattern=NAME.pattern)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant", "system"]  # Claude Code sends system turns in messages
    content: str | list[dict[str, Any]]


class _Prompt(BaseModel):
    """What both `messages` and `count_tokens` read."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[ToolDef] = Field([], max_length=128)
    tool_choice: ToolChoice | None = None
    # Accepted, not applied (see the module's docstring)
    thinking: dict[str, Any] | None = None
    context_management: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    mcp_servers: list[Any] | None = None

    @model_validator(mode="after")
    def _tools_consistent(self) -> _Prompt:
        names = [t.name for t in self.tools]
        if len(set(names)) < len(names):
            raise InvalidRequest("tools: tool names must be unique", param="tools")
        choice = self.tool_choice
        if choice is not None and choice.type == "tool":
            if not choice.name:
                raise InvalidRequest("tool_choice.name is required when type is tool",
                                     param="tool_choice.name")
            if choice.name not in names:
                raise InvalidRequest(f"tool_choice names '{choice.name}', which is not in tools",
                                     param="tool_choice.name")
        if choice is not None and choice.type in ("any", "tool") and not self.tools:
            raise InvalidRequest("tool_choice requires tools", param="tool_choice")
        return self

    def chat_messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        # System turns among the messages join the system prompt: most templates take one, first.
        system = "\n\n".join(t for t in [_system_text(self.system), *(
            _system_text(m.content) for m in self.messages if m.role == "system")] if t)
        if system:
            out.append({"role": "system", "content": system})
        calls: set[str] = set()
        for i, m in enumerate(self.messages):
            if m.role == "system":
                continue
            blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) \
                else m.content
            text, uses, results = _read_blocks(blocks, f"messages.{i}.content")
            if m.role == "assistant":
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if uses:
                    message["tool_calls"] = uses
                    calls.update(u["id"] for u in uses)
                _add(out, message)
                continue
            for tool_use_id, result in results:
                if tool_use_id not in calls:
                    raise InvalidRequest(f"messages.{i}: tool_result block for tool_use_id "
                                         f"'{tool_use_id}' answers no earlier tool_use block",
                                         param=f"messages.{i}.content")
                out.append({"role": "tool", "tool_call_id": tool_use_id, "content": result})
            if text or not results:
                _add(out, {"role": "user", "content": text})
        return out

    def tool_set(self) -> Tools | None:
        choice = self.tool_choice
        if not self.tools or (choice is not None and choice.type == "none"):
            return None
        functions = [{k: v for k, v in {"name": t.name, "description": t.description,
                                        "parameters": t.input_schema}.items() if v is not None}
                     for t in self.tools]
        return Tools(functions=functions,
                     choice="required" if choice is not None and choice.type == "any" else "auto",
                     forced=choice.name if choice is not None and choice.type == "tool" else None,
                     parallel=not (choice is not None and choice.disable_parallel_tool_use))

    def job(self, model: str, **fields: Any) -> GenerationJob:
        return GenerationJob(id=uuid.uuid4().hex, model=model, kind="chat",
                             messages=self.chat_messages(), tools=self.tool_set(), **fields)


class MessagesRequest(_Prompt):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] = Field([], max_length=16)
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int = Field(40, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None
    container: Any = None
    diagnostics: Any = None
    inference_geo: str | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None

    def to_job(self, model: str) -> GenerationJob:
        user = (self.metadata or {}).get("user_id")
        return self.job(model, clamp=True, session=user if isinstance(user, str) else None,
                        sampling=Sampling(max_tokens=self.max_tokens, temperature=self.temperature,
                                          top_p=self.top_p, top_k=self.top_k,
                                          stop=[s for s in self.stop_sequences if s]))


class CountTokensRequest(_Prompt):
    pass


def _system_text(system: str | list[dict[str, Any]] | None) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        text = system
    else:
        parts = []
        for j, block in enumerate(system):
            if block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise InvalidRequest("system: blocks must be text blocks", param=f"system.{j}")
            parts.append(block["text"])
        text = "\n\n".join(p for p in parts if p)
    return BILLING.sub("", text).strip()


def _read_blocks(blocks: list[dict[str, Any]], where: str
                 ) -> tuple[str, list[dict[str, Any]], list[tuple[str, str]]]:
    """A turn's text, its tool_use blocks as chat tool calls, and its tool results."""
    texts, uses, results = [], [], []
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and isinstance(block.get("id"), str) and \
                isinstance(block.get("name"), str):
            uses.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": json.dumps(block.get("input") or {})}})
        elif kind == "tool_result" and isinstance(block.get("tool_use_id"), str):
            content = block.get("content", "")
            if isinstance(content, list):
                content = "".join(c.get("text", "") for c in content
                                  if isinstance(c, dict) and c.get("type") == "text")
            if block.get("is_error"):
                content = f"Error: {content}"
            results.append((block["tool_use_id"], str(content)))
        elif kind in DROPPED:
            continue
        else:
            raise InvalidRequest(f"{where}.{j}: blocks of type {kind!r} are not supported here "
                                 "(the models read text)", param=f"{where}.{j}")
    return "".join(texts), uses, results


def _add(messages: list[dict[str, Any]], message: dict[str, Any]) -> None:
    """Neighbouring turns of one role become one (Anthropic allows them; many templates not)."""
    last = messages[-1] if messages else None
    if last is None or last["role"] != message["role"] or last.get("tool_calls"):
        messages.append(message)
        return
    if message.get("tool_calls"):
        last["tool_calls"] = message["tool_calls"]
    if message["content"]:
        last["content"] = f"{last['content']}\n\n{message['content']}" if last["content"] \
            else message["content"]
