"""`StreamHub` against a real Redis: one XREAD serving several readers, each from its own place."""

from __future__ import annotations

import asyncio
import time

from functions.queue.hub import BLOCK_MS, StreamHub
from shared.redis import connect


def test_each_follower_reads_from_its_own_place_and_a_new_one_does_not_wait(redis_url: str) -> None:
    async def go() -> None:
        redis = await connect(redis_url)
        hub = StreamHub(redis)
        await redis.delete("hubtest:a", "hubtest:b")
        try:
            first = await redis.xadd("hubtest:a", {"m": "1"})
            whole = await hub.follow("hubtest:a")
            assert [e[0] for e in await asyncio.wait_for(whole.inbox.get(), 5)] == [first]
            later = await hub.follow("hubtest:a", first.decode())  # resumes past the first entry
            await asyncio.sleep(0.05)  # the hub is blocked in its XREAD now

            started = time.monotonic()
            entry_b = await redis.xadd("hubtest:b", {"m": "x"})
            other = await hub.follow("hubtest:b")  # cuts the wait: read at once, not after BLOCK_MS
            assert [e[0] for e in await asyncio.wait_for(other.inbox.get(), 5)] == [entry_b]
            assert time.monotonic() - started < BLOCK_MS / 1000 / 2

            second = await redis.xadd("hubtest:a", {"m": "2"})
            for follower in (whole, later):
                assert [e[0] for e in await asyncio.wait_for(follower.inbox.get(), 5)] == [second]
                assert follower.inbox.empty()
            for follower in (whole, later, other):
                hub.leave(follower)
            assert not hub.follows
        finally:
            await hub.close()
            await redis.delete("hubtest:a", "hubtest:b")
            await redis.aclose()

    asyncio.run(go())
