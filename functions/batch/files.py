"""`/files`: upload, list, get, download and delete files, as OpenAI's Files API.

An upload streams to the file store (Quart spools the multipart part to a temporary file on disk,
never whole in memory); the record is a stored object in Redis, owned by the caller.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from quart import Blueprint, Response, request

from functions.batch.file_store import file_store
from functions.batch.protocol import FileList, FileUpload
from functions.context import caller, state
from functions.http import schemas as r
from functions.http.body import parse_query
from functions.http.openapi import operation
from shared.errors import InvalidRequest, NotFound, PayloadTooLarge
from shared.storage import store
from shared.storage.objects import PURPOSES, FileObject, check_id

bp = Blueprint("files", __name__)

EXPIRES_MIN_S, EXPIRES_MAX_S = 3600, 30 * 86400  # OpenAI's bounds on expires_after.seconds


@bp.post("/files")
@operation("Upload a file", form=FileUpload, response=FileObject)
async def upload() -> Any:
    st = state()
    form, files = await request.form, await request.files
    part = files.get("file")
    if part is None or not part.filename:
        raise InvalidRequest("A file is required (multipart field 'file')", param="file",
                             code="missing_required_parameter")
    purpose = form.get("purpose")
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose must be one of {sorted(PURPOSES)}", param="purpose")
    part.stream.seek(0, os.SEEK_END)
    size = part.stream.tell()
    part.stream.seek(0)
    if size > st.settings.files_max_bytes:
        raise PayloadTooLarge(f"The file is {size} bytes; files may be at most "
                              f"{st.settings.files_max_bytes}")
    record = FileObject(id=f"file-{uuid.uuid4().hex[:24]}", owner=caller(), bytes=size,
                        filename=os.path.basename(part.filename)[:255], purpose=purpose,
                        expires_at=_expires_at(form))
    await asyncio.to_thread(file_store(st.settings).put, record.id, part.stream)
    await store.create(st.redis, record)
    return record.public()


@bp.get("/files")
@operation("List files", query=FileList, response=r.Page[FileObject])
async def list_files() -> Any:
    params = parse_query(FileList)
    everyone = await store.list_owned(state().redis, FileObject, caller(), limit=10_000,
                                      order=params.order, after=None, before=None)
    mine = [f for f in everyone["data"] if (params.purpose is None or f["purpose"] == params.purpose)
            and not _expired(f.get("expires_at"))]
    if params.after is not None:
        ids = [f["id"] for f in mine]
        mine = mine[ids.index(params.after) + 1:] if params.after in ids else []
    page = mine[:params.limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(mine) > len(page)}


@bp.get("/files/<file_id>")
@operation("Get a file's record", response=FileObject)
async def get(file_id: str) -> Any:
    return (await owned_file(file_id)).public()


@bp.get("/files/<file_id>/content")
@operation("Download a file's content", media="application/octet-stream")
async def content(file_id: str) -> Response:
    record = await owned_file(file_id)
    chunks = file_store(state().settings).chunks(record.id)

    async def body() -> AsyncIterator[bytes]:
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            yield chunk

    return Response(body(), mimetype="application/octet-stream", headers={
        "Content-Length": str(record.bytes),
        "Content-Disposition": f'attachment; filename="{record.filename}"'})


@bp.delete("/files/<file_id>")
@operation("Delete a file", response=r.Deleted)
async def delete(file_id: str) -> Any:
    record = await owned_file(file_id)
    await remove(record)
    return {"id": record.id, "object": "file", "deleted": True}


async def owned_file(file_id: str) -> FileObject:
    """The caller's file; an expired one is deleted and reads as missing."""
    record = await store.get(state().redis, FileObject, check_id(file_id, "file_id"), caller())
    if _expired(record.expires_at):
        await remove(record)
        raise NotFound(f"No file found with id '{file_id}'")
    return record


async def remove(record: FileObject) -> None:
    await store.delete(state().redis, record)
    await asyncio.to_thread(file_store(state().settings).delete, record.id)


def _expires_at(form: Any) -> int | None:
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest("expires_after[anchor] must be 'created_at'",
                             param="expires_after.anchor")
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        value = -1
    if not EXPIRES_MIN_S <= value <= EXPIRES_MAX_S:
        raise InvalidRequest(f"expires_after[seconds] must be {EXPIRES_MIN_S}-{EXPIRES_MAX_S}",
                             param="expires_after.seconds")
    return int(time.time()) + value


def _expired(expires_at: int | None) -> bool:
    return expires_at is not None and expires_at <= time.time()
