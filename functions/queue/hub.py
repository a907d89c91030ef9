"""One XREAD for all the job streams a web process is relaying.

A reader blocking in an XREAD of its own costs Redis a round trip per stream per write: with many
streams open, most of Redis' work per streamed token, the bound on how many workers one Redis
feeds. The hub keeps one connection blocked in one XREAD over every stream followed in this
process and hands each follower its new entries. A new follower interrupts the wait (CLIENT
UNBLOCK) so its stream is read at once. Several followers of one stream each get what lies past
their own position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis

log = logging.getLogger(__name__)

BLOCK_MS = 1000  # longest one XREAD waits before it is sent again
COUNT = 256  # entries per stream per XREAD
Entry = tuple[bytes, dict[bytes, bytes]]


def _id(entry_id: str | bytes) -> tuple[int, int]:
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


class Follow:
    """One reader's place in one stream, and where the hub puts what it reads for it."""

    def __init__(self, key: str, last_id: str) -> None:
        self.key = key
        self.last_id = last_id
        self.inbox: asyncio.Queue[list[Entry] | BaseException] = asyncio.Queue()


class StreamHub:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.follows: dict[str, list[Follow]] = {}
        self._task: asyncio.Task[None] | None = None
        self._blocked_id: int | None = None  # the hub connection's CLIENT ID while it waits

    async def follow(self, key: str, last_id: str = "0-0") -> Follow:
        f = Follow(key, last_id)
        self.follows.setdefault(key, []).append(f)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="stream-hub")
        else:
            await self._interrupt()
        return f

    def leave(self, f: Follow) -> None:
        followers = self.follows.get(f.key, [])
        if f in followers:
            followers.remove(f)
        if not followers:
            self.follows.pop(f.key, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _interrupt(self) -> None:
        """Cut the XREAD waiting now, so the next one reads the new stream too. The UNBLOCK can
        reach Redis just before the XREAD it means: then it is sent again."""
        for _ in range(50):
            if self._blocked_id is None:
                return  # between two XREADs: the next one includes the new stream
            if await self.redis.client_unblock(self._blocked_id):
                return
            await asyncio.sleep(0.001)

    async def _run(self) -> None:
        conn = Redis(connection_pool=self.redis.connection_pool, single_connection_client=True)
        try:
            conn_id = await conn.client_id()
            while self.follows:
                streams = {key: min((f.last_id for f in fs), key=_id)
                           for key, fs in self.follows.items()}
                self._blocked_id = conn_id
                try:
                    got = await conn.xread(streams, count=COUNT, block=BLOCK_MS)  # type: ignore[arg-type]
                finally:
                    self._blocked_id = None
                for key, entries in got or []:
                    for f in list(self.follows.get(key.decode(), ())):
                        new = [e for e in entries if _id(e[0]) > _id(f.last_id)]
                        if new:
                            f.last_id = new[-1][0].decode()
                            f.inbox.put_nowait(new)
        except Exception as e:  # Redis gone, say: every follower hears it, as its own XREAD would
            log.warning("stream hub stopped: %r", e)
            for fs in self.follows.values():
                for f in fs:
                    f.inbox.put_nowait(e)
            self.follows.clear()
        finally:
            self._task = None
            self._blocked_id = None
            await conn.aclose()
