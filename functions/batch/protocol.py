"""Request models of the Files and Batch APIs: an upload's form, list queries, a new batch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.storage.objects import MetadataField, check_id


class _Body(MetadataField):
    model_config = ConfigDict(extra="ignore")


class FileUpload(BaseModel):
    """`multipart/form-data` fields of an upload."""

    file: bytes
    purpose: str
    expires_after_anchor: Literal["created_at"] | None = Field(None, alias="expires_after[anchor]")
    expires_after_seconds: int | None = Field(None, alias="expires_after[seconds]")


class FileList(BaseModel):
    purpose: str | None = None
    limit: int = Field(10_000, ge=1, le=10_000)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None


class BatchCreate(_Body):
    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"]
    completion_window: Literal["24h"]

    @field_validator("input_file_id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v, "input_file_id")


class BatchList(BaseModel):
    limit: int = Field(20, ge=1, le=100)
    after: str | None = None
