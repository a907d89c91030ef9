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


def test_a_late_follower_of_a_followed_stream_misses_nothing(redis_url: str) -> None:
    """The hub's XREAD waits past the first follower's place; a second follower from the start
    gets every entry even when its interrupt comes too early to cut that wait (no interrupt at
    all, here)."""
    async def go() -> None:
        redis = await connect(redis_url)
        hub = StreamHub(redis)
        await redis.delete("hubtest:c")
        try:
            first = await redis.xadd("hubtest:c", {"m": "1"})
            reader = await hub.follow("hubtest:c")
            assert [e[0] for e in await asyncio.wait_for(reader.inbox.get(), 5)] == [first]
            await asyncio.sleep(0.05)  # blocked in an XREAD from past `first`

            async def too_early() -> None:
                pass

            hub._interrupt = too_early  # type: ignore[method-assign]
            late = await hub.follow("hubtest:c")
            second = await redis.xadd("hubtest:c", {"m": "2"})
            got = [e[0] for e in await asyncio.wait_for(late.inbox.get(), 5)]
            got += [e[0] for e in await asyncio.wait_for(late.inbox.get(), 5)]
            assert got == [first, second] and late.inbox.empty()
            assert [e[0] for e in await asyncio.wait_for(reader.inbox.get(), 5)] == [second]
        finally:
            await hub.close()
            await redis.delete("hubtest:c")
            await redis.aclose()

    asyncio.run(go())
