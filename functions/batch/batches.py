"""`/batches`: OpenAI's Batch API. The handlers only record and read batches; every web process's
`BatchRunner` (functions/batch/runner.py) validates and runs them through the models' queues."""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from functions.batch.files import owned_file
from functions.batch.protocol import BatchCreate, BatchList
from functions.context import caller, state
from functions.http import schemas as r
from functions.http.body import parse_body, parse_query
from functions.http.openapi import operation
from shared import keys
from shared.errors import InvalidRequest, NotFound
from shared.storage import store
from shared.storage.objects import BATCH_DONE, Batch, check_id, new_id, now

bp = Blueprint("batches", __name__)


@bp.post("/batches")
@operation("Create a batch", body=BatchCreate, response=Batch)
async def create() -> Any:
    st = state()
    body = await parse_body(BatchCreate)
    try:
        source = await owned_file(body.input_file_id)
    except NotFound as e:
        raise InvalidRequest(e.message, param="input_file_id") from e
    if source.purpose != "batch":
        raise InvalidRequest(f"File '{source.id}' has purpose '{source.purpose}', not 'batch'",
                             param="input_file_id")
    if source.bytes > st.settings.batch_max_bytes:
        raise InvalidRequest(f"A batch's input may be at most {st.settings.batch_max_bytes} "
                             f"bytes; this one is {source.bytes}", param="input_file_id")
    batch = Batch(id=new_id("batch"), owner=caller(), endpoint=body.endpoint,
                  input_file_id=source.id, completion_window=body.completion_window,
                  metadata=body.metadata)
    await store.create(st.redis, batch)
    await st.redis.sadd(keys.BATCHES, batch.id)  # a runner picks it up within a second
    return batch.public()


@bp.get("/batches")
@operation("List batches, newest first", query=BatchList, response=r.Page[Batch])
async def list_batches() -> Any:
    params = parse_query(BatchList)
    return await store.list_owned(state().redis, Batch, caller(), limit=params.limit,
                                  order="desc", after=params.after, before=None)


@bp.get("/batches/<batch_id>")
@operation("Get a batch", response=Batch)
async def get(batch_id: str) -> Any:
    return (await _owned(batch_id)).public()


@bp.post("/batches/<batch_id>/cancel")
@operation("Cancel a batch: queued lines stop at once, running ones finish or stop",
           response=Batch)
async def cancel(batch_id: str) -> Any:
    batch = await _owned(batch_id)
    if batch.status not in BATCH_DONE and batch.status != "cancelling":
        batch = await update(batch.id, {"validating", "in_progress", "finalizing"},
                             status="cancelling", cancelling_at=now()) or batch
    return batch.public()


async def _owned(batch_id: str) -> Batch:
    return await store.get(state().redis, Batch, check_id(batch_id, "batch_id"), caller())


async def update(batch_id: str, when: set[str] | None = None, **changes: Any) -> Batch | None:
    """Change the batch if its status is one of `when` (any, if None); the batch as it is now."""
    return await store.update(state().redis, Batch, batch_id, when, **changes)
