"""The store on a real Redis: every object has an owner, and nobody sees another's."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from shared.errors import NotFound
from shared.storage import store
from shared.storage.objects import Assistant, Message, Thread, new_id


def test_owners_see_only_their_own_objects(redis_url: str) -> None:
    async def scenario() -> None:
        redis = Redis.from_url(redis_url)
        try:
            mine = Thread(id=new_id("thread"), owner="alice", title="a")
            theirs = Thread(id=new_id("thread"), owner="bob", title="b")
            bots = [Assistant(id=new_id("asst"), owner=o) for o in ("alice", "bob")]
            for item in (mine, theirs, *bots):
                await store.create(redis, item)
            listed = await store.list_owned(redis, Thread, "alice", limit=100, order="desc",
                                            after=None, before=None)
            assert mine.id in [t["id"] for t in listed["data"]]
            assert theirs.id not in [t["id"] for t in listed["data"]]
            assert (await store.get(redis, Thread, mine.id, "alice")).title == "a"
            with pytest.raises(NotFound):
                await store.get(redis, Thread, theirs.id, "alice")
            with pytest.raises(NotFound):
                await store.get(redis, Assistant, bots[1].id, "alice")

            await store.delete(redis, theirs)
            orphan = Message(id=new_id("msg"), owner="bob", thread_id=theirs.id, role="user",
                             content=Message.content_of("too late"))
            with pytest.raises(NotFound):  # no message lands in a deleted thread
                await store.append(redis, orphan)
        finally:
            await redis.aclose()

    asyncio.run(scenario())
