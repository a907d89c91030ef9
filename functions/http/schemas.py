"""The answer shapes every endpoint family shares, for the OpenAPI document: errors, pages of
a list, a deletion.

Stored objects (assistants, threads, messages, runs, users, API keys) are documented by their own
models in `shared`, and each family's own answers live in its room (`functions.openai.answers`,
say). The schemathesis test checks them against real answers and fails on any that differ.
"""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

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
