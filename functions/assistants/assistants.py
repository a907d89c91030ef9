"""`/assistants`: create, list, get, modify, delete."""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from functions.assistants.protocol import AssistantCreate, AssistantModify, ListParams
from functions.context import caller, state
from functions.http import schemas as r
from functions.http.body import parse_body, parse_query
from functions.http.openapi import operation
from shared import keys
from shared.storage import store
from shared.storage.objects import DEFAULT_ASSISTANT, Assistant, check_id, new_id, now

bp = Blueprint("assistants", __name__)


@bp.post("/assistants")
@operation("Create an assistant", body=AssistantCreate, response=Assistant)
async def create() -> Any:
    body = await parse_body(AssistantCreate)
    assistant = Assistant(id=new_id("asst"), owner=caller(), **body.model_dump())
    await store.create(state().redis, assistant)
    return assistant.public()


@bp.get("/assistants")
@operation("List assistants", query=ListParams, response=r.Page[Assistant])
async def list_assistants() -> Any:
    params = parse_query(ListParams)
    return await store.list_owned(state().redis, Assistant, caller(), **params.paging())


@bp.get("/assistants/<assistant_id>")
@operation("Get an assistant", response=Assistant)
async def get(assistant_id: str) -> Any:
    return (await _owned(assistant_id)).public()


@bp.post("/assistants/<assistant_id>")
@bp.patch("/assistants/<assistant_id>")
@operation("Modify an assistant", body=AssistantModify, response=Assistant)
async def modify(assistant_id: str) -> Any:
    assistant = await _owned(assistant_id)
    body = await parse_body(AssistantModify)
    assistant = assistant.model_copy(update=body.model_dump(exclude_unset=True))
    await store.save(state().redis, assistant)
    return assistant.public()


@bp.delete("/assistants/<assistant_id>")
@operation("Delete an assistant", response=r.Deleted)
async def delete(assistant_id: str) -> Any:
    assistant = await _owned(assistant_id)
    await store.delete(state().redis, assistant)
    return {"id": assistant.id, "object": "assistant.deleted", "deleted": True}


async def _owned(assistant_id: str) -> Assistant:
    return await store.get(state().redis, Assistant, check_id(assistant_id, "assistant_id"),
                           caller())


async def ensure_default(redis: Any, owner: str) -> None:
    """A new install has Jan's default assistant."""
    if not await redis.exists(keys.obj("assistant", DEFAULT_ASSISTANT)):
        await store.create(redis, Assistant(
            id=DEFAULT_ASSISTANT, owner=owner, name="Jan", created_at=now(),
            description="A default assistant that can use all downloaded models",
            instructions="You are a helpful assistant.",
        ))
