"""Request bodies and query parameters for assistants, threads, messages, runs, conversations."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from functions.openai.protocol import TextPart, ToolChoice, ToolDef
from shared.storage.objects import MetadataField, check_id


class _Body(MetadataField):
    model_config = ConfigDict(extra="ignore")


class AssistantCreate(_Body):
    name: str | None = Field(None, max_length=256)
    description: str | None = Field(None, max_length=512)
    model: str | None = None
    instructions: str | None = Field(None, max_length=256_000)
    avatar: str | None = Field(None, max_length=2048)
    settings: dict[str, Any] = {}
    parameters: dict[str, Any] = {}
    tools: list[ToolDef] = Field([], max_length=128)  # functions only: Ferry runs no code


class AssistantModify(AssistantCreate):
    pass


class MessageCreate(_Body):
    role: Literal["user", "assistant"]
    content: str | list[TextPart]
    file_ids: list[str] = []

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    @field_validator("content")
    @classmethod
    def _not_empty(cls, v: str | list[TextPart]) -> str | list[TextPart]:
        text = v if isinstance(v, str) else "".join(p.text for p in v)
        if not text.strip():
            raise ValueError("content must not be empty")
        return v


class MessageModify(_Body):
    pass


class ThreadAssistant(BaseModel):
    model_config = ConfigDict(extra="allow")

    assistant_id: str = "jan"

    @field_validator("assistant_id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v, "assistants.assistant_id")


class ThreadCreate(_Body):
    title: str = Field("", max_length=512)
    model: str | None = None
    assistants: list[ThreadAssistant] = Field([], max_length=8)
    messages: list[MessageCreate] = Field([], max_length=32)


class ThreadModify(_Body):
    """Only the fields sent change (a thread's title and assistants cannot be null)."""

    title: str = Field("", max_length=512)
    model: str | None = None
    assistants: list[ThreadAssistant] = Field([], max_length=8)


class RunCreate(_Body):
    assistant_id: str | None = None
    model: str | None = None
    instructions: str | None = Field(None, max_length=256_000)
    additional_instructions: str | None = Field(None, max_length=256_000)
    stream: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    tools: list[ToolDef] | None = Field(None, max_length=128)  # None: the assistant's
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True


class ToolOutput(BaseModel):
    tool_call_id: str
    output: str = ""


class SubmitToolOutputs(_Body):
    tool_outputs: list[ToolOutput] = Field(min_length=1)
    stream: bool = False


class ConversationCreate(_Body):
    title: str = Field("", max_length=512)
    model: str | None = None


class ListParams(BaseModel):
    """OpenAI list pagination, from the query string."""

    limit: int = Field(20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None
    before: str | None = None

    def paging(self) -> dict[str, Any]:
        return self.model_dump()
