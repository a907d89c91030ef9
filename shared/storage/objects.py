"""Stored objects: assistants, threads (also served as conversations), messages and runs.

Shapes follow Jan's 0.1.8 documents and OpenAI's Assistants API, which they copy. Each object
records its owner; `public()` is what the API returns (the owner is never shown).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from shared.errors import InvalidRequest

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
_ID = re.compile(r"^[A-Za-z0-9_-]{1,96}$")

DEFAULT_ASSISTANT = "jan"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def check_id(value: str, param: str) -> str:
    """Ids become parts of Redis keys: a closed character set, else 400 naming the parameter."""
    if not _ID.match(value):
        raise InvalidRequest(f"Malformed id {value[:100]!r}", param=param, code="invalid_id")
    return value


def check_metadata(value: dict[str, Any] | None) -> dict[str, str]:
    """OpenAI's limits: 16 pairs, keys up to 64 characters, string values up to 512."""
    value = value or {}
    if not isinstance(value, dict):
        raise ValueError("metadata must be an object of string values")
    if len(value) > MAX_METADATA_PAIRS:
        raise ValueError(f"metadata may have at most {MAX_METADATA_PAIRS} pairs")
    for k, v in value.items():
        if len(k) > MAX_METADATA_KEY:
            raise ValueError(f"metadata keys may be at most {MAX_METADATA_KEY} characters")
        if not isinstance(v, str) or len(v) > MAX_METADATA_VALUE:
            raise ValueError(f"metadata values must be strings of at most {MAX_METADATA_VALUE} "
                             "characters")
    return value


class Stored(BaseModel):
    id: str
    owner: str
    created_at: int = Field(default_factory=now)
    metadata: dict[str, str] = {}

    def public(self) -> dict[str, Any]:
        return self.model_dump(exclude={"owner"})


class Assistant(Stored):
    object: Literal["assistant"] = "assistant"
    name: str | None = None
    description: str | None = None
    model: str | None = None  # None: the server's default model
    instructions: str | None = None
    avatar: str | None = None
    settings: dict[str, Any] = {}  # Jan: per-assistant model settings (ctx_len, ...)
    parameters: dict[str, Any] = {}  # Jan: default sampling parameters (temperature, ...)
    tools: list[dict[str, Any]] = []  # OpenAI's: [{"type": "function", "function": {...}}]


class Thread(Stored):
    """A thread; the server API's conversations are the same objects seen through another path."""

    object: Literal["thread"] = "thread"
    title: str = ""
    model: str | None = None
    assistants: list[dict[str, Any]] = []  # Jan: [{"assistant_id": ..., "model": {...}}]
    updated_at: int = Field(default_factory=now)

    @property
    def assistant_id(self) -> str:
        return next((a["assistant_id"] for a in self.assistants if a.get("assistant_id")),
                    DEFAULT_ASSISTANT)

    def as_conversation(self) -> dict[str, Any]:
        out = self.public()
        out["object"] = "conversation"
        return out


class TextContent(BaseModel):
    value: str
    annotations: list[Any] = []


class ContentPart(BaseModel):
    type: Literal["text"] = "text"
    text: TextContent


class Message(Stored):
    object: Literal["thread.message"] = "thread.message"
    thread_id: str
    role: Literal["user", "assistant"]
    content: list[ContentPart]
    assistant_id: str | None = None
    run_id: str | None = None
    file_ids: list[str] = []
    status: Literal["completed", "incomplete"] = "completed"

    @property
    def text(self) -> str:
        return "".join(part.text.value for part in self.content)

    @staticmethod
    def content_of(text: str) -> list[ContentPart]:
        return [ContentPart(text=TextContent(value=text))]


RunStatus = Literal["queued", "in_progress", "requires_action", "completed", "incomplete",
                    "cancelling", "cancelled", "failed"]
FINISHED: set[str] = {"completed", "incomplete", "cancelled", "failed"}


class Run(Stored):
    object: Literal["thread.run"] = "thread.run"
    thread_id: str
    assistant_id: str
    model: str
    instructions: str | None = None
    status: RunStatus = "queued"
    job_id: str
    started_at: int | None = None
    completed_at: int | None = None
    cancelled_at: int | None = None
    failed_at: int | None = None
    last_error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    usage: dict[str, int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] = []
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    # {"type": "submit_tool_outputs", "submit_tool_outputs": {"tool_calls": [...]}}
    required_action: dict[str, Any] | None = None
    tool_turns: list[dict[str, Any]] = []  # this run's calls and their results, for the prompt

    def public(self) -> dict[str, Any]:
        return self.model_dump(exclude={"owner", "job_id", "tool_turns"})


PURPOSES = {"batch", "batch_output", "assistants", "fine-tune", "vision", "user_data", "evals"}


class FileObject(Stored):
    """An uploaded file (or a batch's results); its bytes live in the file store."""

    object: Literal["file"] = "file"
    bytes: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None

    def public(self) -> dict[str, Any]:
        return self.model_dump(exclude={"owner", "metadata"})


BatchStatus = Literal["validating", "in_progress", "finalizing", "completed", "failed", "expired",
                      "cancelling", "cancelled"]
BATCH_DONE: set[str] = {"completed", "failed", "expired", "cancelled"}


class BatchCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(Stored):
    """OpenAI's batch object; its lines run as ordinary jobs (`functions.batch.driver`)."""

    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str = "24h"
    status: BatchStatus = "validating"
    errors: dict[str, Any] | None = None  # {"object": "list", "data": [{code, line, message, param}]}
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchCounts = BatchCounts()
    usage: dict[str, Any] = Field(default_factory=lambda: {
        "input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0}})


class MetadataField(BaseModel):
    """Mixin for request bodies that carry OpenAI-limited metadata."""

    metadata: dict[str, Any] = {}

    @field_validator("metadata", mode="before")
    @classmethod
    def _limits(cls, v: dict[str, Any] | None) -> dict[str, str]:
        return check_metadata(v)
