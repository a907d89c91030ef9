"""Stored objects in Redis: create, read (owner-checked), modify, delete, and list by index.

Writes that belong together are atomic (a transaction, or a Lua script where a value read must
feed the write). Listings page through per-owner and per-thread sorted sets, never the keyspace.
The key layout is documented in `shared.keys`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args

from redis.asyncio import Redis
from redis.exceptions import WatchError

from shared import keys
from shared.errors import InvalidRequest, NotFound
from shared.jobs import Reply, Usage
from shared.storage.objects import (
    FINISHED,
    Assistant,
    Batch,
    FileObject,
    Message,
    Run,
    RunStatus,
    Stored,
    Thread,
    now,
)

S = TypeVar("S", bound=Stored)
KIND: dict[type[Stored], str] = {Assistant: "assistant", Thread: "thread", Run: "run",
                                 FileObject: "file", Batch: "batch"}
Order = Literal["asc", "desc"]

# Append a message only if its thread still exists; its place comes from the thread's counter,
# so concurrent appends keep one total order and none is lost.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], n, ARGV[1])
return n
"""


async def create(redis: Redis, item: Stored) -> None:
    kind = KIND[type(item)]
    place = await redis.incr(keys.SEQ)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.obj(kind, item.id), item.model_dump_json())
        pipe.zadd(keys.owned(item.owner, kind), {item.id: place})
        await pipe.execute()


async def get(redis: Redis, cls: type[S], object_id: str, owner: str) -> S:
    """The object, or 404 when it does not exist or belongs to someone else."""
    raw = await redis.get(keys.obj(KIND[cls], object_id))
    item = cls.model_validate_json(raw) if raw is not None else None
    if item is None or item.owner != owner:
        raise NotFound(f"No {KIND[cls]} found with id '{object_id}'")
    return item


async def save(redis: Redis, item: Stored) -> None:
    await redis.set(keys.obj(KIND[type(item)], item.id), item.model_dump_json())


async def delete(redis: Redis, item: Stored) -> None:
    kind = KIND[type(item)]
    extra: list[str] = []
    if isinstance(item, Thread):
        run_ids = [r.decode() for r in await redis.zrange(keys.thread_runs(item.id), 0, -1)]
        extra = [keys.thread_messages(item.id), keys.thread_order(item.id),
                 keys.thread_seq(item.id), keys.thread_runs(item.id),
                 *(keys.obj("run", r) for r in run_ids)]
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.obj(kind, item.id), *extra)
        pipe.zrem(keys.owned(item.owner, kind), item.id)
        await pipe.execute()


async def page(
    redis: Redis, index: str, load: Callable[[list[str]], Any], *, limit: int, order: Order,
    after: str | None, before: str | None,
) -> dict[str, Any]:
    """One page of an OpenAI-style list over a sorted-set index (cursors are object ids)."""
    low, high = "-inf", "+inf"
    for cursor, param in ((after, "after"), (before, "before")):
        if cursor is None:
            continue
        score = await redis.zscore(index, cursor)
        if score is None:
            raise InvalidRequest(f"Unknown cursor '{cursor}'", param=param)
        bound = f"({score}"
        if (param == "after") == (order == "asc"):
            low = bound
        else:
            high = bound
    if order == "asc":
        ids = await redis.zrangebyscore(index, low, high, start=0, num=limit + 1)
    else:
        ids = await redis.zrevrangebyscore(index, high, low, start=0, num=limit + 1)
    ids = [i.decode() for i in ids]
    data = await load(ids[:limit])
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ids) > limit,
    }


def _objects(redis: Redis, cls: type[Stored]) -> Callable[[list[str]], Any]:
    """A `page` loader for objects stored under ``keys.obj``."""

    async def load(ids: list[str]) -> list[dict[str, Any]]:
        raws = await redis.mget([keys.obj(KIND[cls], i) for i in ids]) if ids else []
        return [cls.model_validate_json(r).public() for r in raws if r is not None]

    return load


async def list_owned(redis: Redis, cls: type[Stored], owner: str, **paging: Any) -> dict[str, Any]:
    return await page(redis, keys.owned(owner, KIND[cls]), _objects(redis, cls), **paging)


# Messages


async def append(redis: Redis, message: Message) -> None:
    tid = message.thread_id
    script = redis.register_script(_APPEND)
    placed = await script(
        keys=[keys.obj("thread", tid), keys.thread_messages(tid), keys.thread_order(tid),
              keys.thread_seq(tid)],
        args=[message.id, message.model_dump_json()],
    )
    if not placed:
        raise NotFound(f"No thread found with id '{tid}'")


async def get_message(redis: Redis, thread: Thread, message_id: str) -> Message:
    raw = await redis.hget(keys.thread_messages(thread.id), message_id)
    if raw is None:
        raise NotFound(f"No message found with id '{message_id}' in thread '{thread.id}'")
    return Message.model_validate_json(raw)


async def save_message(redis: Redis, message: Message) -> None:
    await redis.hset(keys.thread_messages(message.thread_id), message.id, message.model_dump_json())


async def list_messages(redis: Redis, thread: Thread, **paging: Any) -> dict[str, Any]:
    async def load(ids: list[str]) -> list[dict[str, Any]]:
        raws = await redis.hmget(keys.thread_messages(thread.id), ids) if ids else []
        return [Message.model_validate_json(r).public() for r in raws if r is not None]

    return await page(redis, keys.thread_order(thread.id), load, **paging)


async def history(redis: Redis, thread: Thread, last: int = 1000) -> list[Message]:
    """The thread's newest `last` messages, oldest first."""
    ids = await redis.zrange(keys.thread_order(thread.id), -last, -1)
    raws = await redis.hmget(keys.thread_messages(thread.id), ids) if ids else []
    return [Message.model_validate_json(r) for r in raws if r is not None]


# Runs


async def create_run(redis: Redis, run: Run) -> None:
    """Runs are listed per thread, not per owner."""
    place = await redis.incr(keys.SEQ)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.obj("run", run.id), run.model_dump_json())
        pipe.zadd(keys.thread_runs(run.thread_id), {run.id: place})
        await pipe.execute()


async def list_runs(redis: Redis, thread: Thread, **paging: Any) -> dict[str, Any]:
    return await page(redis, keys.thread_runs(thread.id), _objects(redis, Run), **paging)


async def update(redis: Redis, cls: type[S], object_id: str, when: set[str] | None = None,
                 **changes: Any) -> S | None:
    """Apply `changes` unless the object's status is not one of `when`; the object as it is now,
    or None if it is gone."""
    key = keys.obj(KIND[cls], object_id)
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(key)
                raw = await pipe.get(key)
                if raw is None:
                    return None
                item = cls.model_validate_json(raw)
                if when is not None and getattr(item, "status", None) not in when:
                    return item
                item = item.model_copy(update=changes)
                pipe.multi()
                pipe.set(key, item.model_dump_json())
                await pipe.execute()
                return item
            except WatchError:
                continue


async def update_run(redis: Redis, run_id: str, when: set[str] | None = None, **changes: Any
                     ) -> Run | None:
    """Apply `changes` unless the run already finished (a finished run never changes again),
    or is not in one of the statuses `when` names."""
    unfinished = set(get_args(RunStatus)) - FINISHED
    return await update(redis, Run, run_id, unfinished if when is None else when & unfinished,
                        **changes)


async def store_reply(redis: Redis, reply: Reply, text: str, usage: Usage) -> None:
    """Called by the worker when a generation that answers a thread is complete."""
    message = Message(
        id=reply.message_id, owner=reply.owner, thread_id=reply.thread_id, role="assistant",
        content=Message.content_of(text), assistant_id=reply.assistant_id, run_id=reply.run_id,
    )
    await append(redis, message)
    if reply.run_id:
        await update_run(redis, reply.run_id, status="completed", completed_at=now(),
                         usage={"prompt_tokens": usage.prompt_tokens,
                                "completion_tokens": usage.completion_tokens,
                                "total_tokens": usage.total_tokens})


async def require_action(redis: Redis, reply: Reply, text: str, calls: list[dict[str, Any]]
                         ) -> None:
    """A run's answer called tools: it waits for their outputs (submit_tool_outputs)."""
    assert reply.run_id is not None
    run = await redis.get(keys.obj("run", reply.run_id))
    turns = Run.model_validate_json(run).tool_turns if run is not None else []
    turn = {"role": "assistant", "content": text or None, "tool_calls": calls}
    await update_run(redis, reply.run_id, status="requires_action", tool_turns=[*turns, turn],
                     required_action={"type": "submit_tool_outputs",
                                      "submit_tool_outputs": {"tool_calls": calls}})


async def end_run(redis: Redis, reply: Reply, outcome: str, error: dict[str, Any] | None) -> None:
    """A run whose generation was cancelled, failed, or ran out of tokens mid-call."""
    if not reply.run_id:
        return
    if outcome == "cancelled":
        await update_run(redis, reply.run_id, status="cancelled", cancelled_at=now())
    elif outcome == "incomplete":
        await update_run(redis, reply.run_id, status="incomplete", completed_at=now(),
                         incomplete_details={"reason": "max_completion_tokens"})
    else:
        await update_run(redis, reply.run_id, status="failed", failed_at=now(), last_error=error)
