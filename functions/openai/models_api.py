"""`/models`: list and get, download (with progress), start and stop on workers, and delete."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from quart import Blueprint

from functions.context import FerryState, state
from functions.http import schemas as r
from functions.http import sse
from functions.http.body import parse_body
from functions.http.openapi import STREAM, operation
from functions.http.sse import Event
from functions.identity.auth import require_admin
from functions.openai import answers as a
from shared import keys
from shared.errors import Conflict, InvalidRequest
from shared.fleet import control
from shared.registry import downloads, models
from shared.registry.models import ModelRecord
from shared.registry.sources import check_url, file_name

bp = Blueprint("models", __name__)
log = logging.getLogger(__name__)

MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
FINAL_DOWNLOAD_STATES = {"downloaded", "error", "cancelled"}


class DownloadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    source_url: str
    id: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    name: str = Field("", max_length=256)
    description: str = Field("", max_length=2048)
    parameters: dict[str, Any] = {}
    settings: dict[str, Any] = {}

    @field_validator("source_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_url(v)


@bp.get("/models")
@operation("List models", response=r.Page[a.ModelInfo])
async def list_models() -> Any:
    records = await models.all_models(state().redis)
    return {"object": "list", "data": [await _public(r) for r in records]}


@bp.get("/models/<model_id>")
@operation("Get a model", response=a.ModelInfo)
async def get_model(model_id: str) -> Any:
    record = await models.get(state().redis, model_id)
    out = await _public(record)
    progress = await _progress_of(state().redis, model_id)
    if progress:
        out["download"] = progress
    return out


@bp.post("/models")
@operation("Download a model (admin)", body=DownloadRequest)
async def download() -> Any:
    require_admin()
    req = await parse_body(DownloadRequest)
    model_id = req.id or file_name(req.source_url).removesuffix(".gguf").lower()
    if not MODEL_ID.match(model_id):
        raise InvalidRequest("id must be lower-case letters, digits, '.', '_' or '-' "
                             "(at most 128), starting with a letter or digit", param="id")
    record = ModelRecord(
        id=model_id, created=int(time.time()), source_url=req.source_url, state="downloading",
        name=req.name, description=req.description, parameters=req.parameters,
        settings=req.settings,
    )
    return await _start(record, req.sha256)


@bp.get("/models/download/<model_id>")
@operation("Download a registered model again (admin)")
async def download_again(model_id: str) -> Any:
    """Jan's form: (re)start the download of a model known by id (one with a source_url)."""
    require_admin()
    record = await models.get(state().redis, model_id)
    stuck = record.state == "downloading" and downloads.stalled(await _progress_of(state().redis, model_id))
    if not (record.state == "error" or stuck) or not record.source_url:
        raise Conflict(f"Model '{model_id}' is {record.state}; nothing to download")
    await models.forget(state().redis, model_id)
    return await _start(record.model_copy(update={"state": "downloading", "error": None}), None)


@bp.get("/models/<model_id>/progress")
@operation("A download's progress, as Server-Sent Events", media=STREAM)
async def progress(model_id: str) -> Any:
    """The download's progress as Server-Sent Events, until it ends."""
    redis = state().redis
    await models.get(redis, model_id)

    async def events() -> AsyncIterator[Event | None]:  # runs after the handler returned
        while True:
            now = await _progress_of(redis, model_id)
            yield Event({"id": model_id, "object": "model.download", **now})
            if now.get("state") in FINAL_DOWNLOAD_STATES:
                return
            await asyncio.sleep(downloads.PROGRESS_EVERY_S)

    return await sse.respond_after_first(events(), state().settings.keepalive_s)


@bp.put("/models/<model_id>/start")
@operation("Load a model on a worker (admin)", response=a.ModelState)
async def start(model_id: str) -> Any:
    """Load the model on a worker (placed by memory, evicting idle models if need be)."""
    require_admin()
    st = state()
    worker = await control.start(st.redis, st.settings, model_id)
    return {"id": model_id, "object": "model", "state": "running",
            "worker": {"id": worker.id, "host": worker.host, "device": worker.device}}


@bp.put("/models/<model_id>/stop")
@operation("Unload a model everywhere (admin)", response=a.ModelState)
async def stop(model_id: str) -> Any:
    require_admin()
    st = state()
    await control.stop(st.redis, st.settings, model_id)
    return {"id": model_id, "object": "model", "state": "stopped"}


@bp.delete("/models/<model_id>")
@operation("Delete a model and its files (admin)", response=r.Deleted)
async def delete(model_id: str) -> Any:
    """Cancel a running download, or stop the model and remove it with its files."""
    require_admin()
    st = state()
    record = await models.get(st.redis, model_id)
    if record.state == "downloading" and not downloads.stalled(await _progress_of(st.redis, model_id)):
        await st.redis.set(keys.download_cancel(model_id), b"1", ex=3600)
    else:
        await control.delete(st.redis, st.settings, model_id)
    return {"id": model_id, "object": "model", "deleted": True}


async def _start(record: ModelRecord, sha256: str | None) -> Any:
    st = state()
    if not await models.claim(st.redis, record):
        raise Conflict(f"Model '{record.id}' already exists or is downloading")
    await st.redis.delete(keys.download_cancel(record.id), keys.download(record.id))
    task = asyncio.create_task(_download(st, record, sha256))
    st.downloads.add(task)
    task.add_done_callback(st.downloads.discard)
    return {"message": f"Starting download {record.id}", "id": record.id, "object": "model",
            "state": "downloading"}


async def _download(st: FerryState, record: ModelRecord, sha256: str | None) -> None:
    try:
        await downloads.run(st.redis, st.settings, record, sha256)
    except downloads.Cancelled:
        log.info("download of %s cancelled", record.id)
    except Exception:
        log.exception("download of %s failed", record.id)


async def _public(record: ModelRecord) -> dict[str, Any]:
    return record.public(await models.current_state(state().redis, record))


async def _progress_of(redis: Any, model_id: str) -> dict[str, int | str]:
    """A download's progress, numbers as numbers; {} when there is none."""
    raw = await redis.hgetall(keys.download(model_id))
    return {k.decode(): int(v) if v.isdigit() else v.decode() for k, v in raw.items()}

