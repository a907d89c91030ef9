"""`/threads` and `/threads/{id}/messages`: create, list, get, modify, delete."""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from functions.assistants.protocol import ListParams, MessageCreate, MessageModify, ThreadCreate, ThreadModify
from functions.context import caller, state
from functions.http import schemas as r
from functions.http.body import parse_body, parse_query
from functions.http.openapi import operation
from shared.errors import InvalidRequest
from shared.storage import store
from shared.storage.objects import Message, Thread, check_id, new_id, now

bp = Blueprint("threads", __name__)


@bp.post("/threads")
@operation("Create a thread", body=ThreadCreate, response=Thread)
async def create() -> Any:
    body = await parse_body(ThreadCreate)
    thread = Thread(
        id=new_id("thread"), owner=caller(), title=body.title, model=body.model,
        metadata=body.metadata, assistants=[a.model_dump() for a in body.assistants],
    )
    await store.create(state().redis, thread)
    for m in body.messages:
        await store.append(state().redis, new_message(thread, m))
    return thread.public()


@bp.get("/threads")
@operation("List threads", query=ListParams, response=r.Page[Thread])
async def list_threads() -> Any:
    params = parse_query(ListParams)
    return await store.list_owned(state().redis, Thread, caller(), **params.paging())


@bp.get("/threads/<thread_id>")
@operation("Get a thread", response=Thread)
async def get(thread_id: str) -> Any:
    return (await owned_thread(thread_id)).public()


@bp.post("/threads/<thread_id>")
@bp.patch("/threads/<thread_id>")
@operation("Modify a thread", body=ThreadModify, response=Thread)
async def modify(thread_id: str) -> Any:
    thread = await owned_thread(thread_id)
    changes = (await parse_body(ThreadModify)).model_dump(exclude_unset=True)
    thread = thread.model_copy(update=changes | {"updated_at": now()})
    await store.save(state().redis, thread)
    return thread.public()


@bp.delete("/threads/<thread_id>")
@operation("Delete a thread and its messages", response=r.Deleted)
async def delete(thread_id: str) -> Any:
    thread = await owned_thread(thread_id)
    await store.delete(state().redis, thread)
    return {"id": thread.id, "object": "thread.deleted", "deleted": True}


@bp.post("/threads/<thread_id>/messages")
@operation("Add a message", body=MessageCreate, response=Message)
async def create_message(thread_id: str) -> Any:
    thread = await owned_thread(thread_id)
    message = new_message(thread, await parse_body(MessageCreate))
    await store.append(state().redis, message)
    return message.public()


@bp.get("/threads/<thread_id>/messages")
@operation("List a thread's messages", query=ListParams, response=r.Page[Message])
async def list_messages(thread_id: str) -> Any:
    thread = await owned_thread(thread_id)
    params = parse_query(ListParams)
    return await store.list_messages(state().redis, thread, **params.paging())


@bp.get("/threads/<thread_id>/messages/<message_id>")
@operation("Get a message", response=Message)
async def get_message(thread_id: str, message_id: str) -> Any:
    thread = await owned_thread(thread_id)
    return (await store.get_message(state().redis, thread, check_id(message_id, "message_id"))
            ).public()


@bp.post("/threads/<thread_id>/messages/<message_id>")
@operation("Modify a message", body=MessageModify, response=Message)
async def modify_message(thread_id: str, message_id: str) -> Any:
    thread = await owned_thread(thread_id)
    message = await store.get_message(state().redis, thread, check_id(message_id, "message_id"))
    body = await parse_body(MessageModify)
    message = message.model_copy(update={"metadata": body.metadata})
    await store.save_message(state().redis, message)
    return message.public()


async def owned_thread(thread_id: str) -> Thread:
    return await store.get(state().redis, Thread, check_id(thread_id, "thread_id"), caller())


def new_message(thread: Thread, body: MessageCreate) -> Message:
    limit = state().settings.max_message_chars
    if len(body.text) > limit:
        raise InvalidRequest(f"content is longer than {limit} characters", param="content",
                             code="string_above_max_length")
    return Message(
        id=new_id("msg"), owner=thread.owner, thread_id=thread.id, role=body.role,
        content=Message.content_of(body.text), metadata=body.metadata,
        file_ids=body.file_ids,
    )
