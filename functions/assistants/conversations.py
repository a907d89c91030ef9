"""`/conversations` (Jan Server): threads seen through the server API's shape.

A conversation *is* a thread: the same stored object, listed by either path. A chat completion
that names a conversation appends the user's new messages and, once generated, the reply.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel
from quart import Blueprint

from functions.assistants.protocol import ConversationCreate, ListParams
from functions.assistants.threads import owned_thread
from functions.context import caller, state
from functions.http import schemas as r
from functions.http.body import parse_body, parse_query
from functions.http.openapi import operation
from functions.openai.protocol import ChatCompletionRequest
from shared.storage import store
from shared.storage.objects import Message, Thread, new_id


class Conversation(BaseModel):
    id: str
    object: Literal["conversation"]
    title: str
    model: str | None
    created_at: int
    updated_at: int
    metadata: dict[str, str]
    assistants: list[dict[str, Any]]


bp = Blueprint("conversations", __name__)


@bp.post("/conversations")
@operation("Create a conversation", body=ConversationCreate, response=Conversation)
async def create() -> Any:
    body = await parse_body(ConversationCreate)
    thread = Thread(id=new_id("conv"), owner=caller(), title=body.title, model=body.model,
                    metadata=body.metadata)
    await store.create(state().redis, thread)
    return thread.as_conversation()


@bp.get("/conversations")
@operation("List conversations", query=ListParams, response=r.Page[Conversation])
async def list_conversations() -> Any:
    params = parse_query(ListParams)
    listing = await store.list_owned(state().redis, Thread, caller(), **params.paging())
    for item in listing["data"]:
        item["object"] = "conversation"
    return listing


@bp.get("/conversations/<conversation_id>")
@operation("Get a conversation with its messages", response=Conversation)
async def get(conversation_id: str) -> Any:
    thread = await owned_thread(conversation_id)
    out = thread.as_conversation()
    out["messages"] = [
        {"id": m.id, "role": m.role, "content": m.text, "created_at": m.created_at}
        for m in await store.history(state().redis, thread)
    ]
    return out


async def record_turn(conversation_id: str, req: ChatCompletionRequest) -> Thread:
    """Append the request's new user messages (those after its last assistant message)."""
    thread = await owned_thread(conversation_id)
    roles = [m.role for m in req.messages]
    start = len(roles) - roles[::-1].index("assistant") if "assistant" in roles else 0
    for m in req.messages[start:]:
        if m.role == "user":
            await store.append(state().redis, Message(
                id=new_id("msg"), owner=thread.owner, thread_id=thread.id, role="user",
                content=Message.content_of(m.as_text()["content"]),
            ))
    return thread
