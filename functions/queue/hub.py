"""One XREAD for all the job streams a web process is relaying.

A reader blocking in an XREAD of its own costs Redis a round trip per stream per write: with many
streams open, most of Redis' work per streamed token, the bound on how many workers one Redis
feeds. The hub keeps one connection blocked in one XREAD over every stream followed in this
process and hands each follower its new entries. A new follower interrupts the wait (CLIENT
UNBLOCK) so its stream is read at once. Several followers of one stream each get what lies past
their own position.

A lost connection to Redis (a restart) keeps every follower: the hub reconnects and reads on from
each one's place, for up to `outage_s`; then the followers hear that Redis is unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import ConnectionError, TimeoutError

from shared.errors import Unavailable
from shared.jobs import entry_parts

log = logging.getLogger(__name__)

BLOCK_MS = 1000  # longest one XREAD waits before it is sent again
COUNT = 256  # entries per stream per XREAD
RECONNECT_S = 0.25  # while Redis is unreachable: how often the hub tries again
SETTLE_S = 5.0  # after Redis comes back, workers' heartbeats are not judged for this long
Entry = tuple[bytes, dict[bytes, bytes]]


class Follow:
    """One reader's place in one stream, and where the hub puts what it reads for it."""

    def __init__(self, key: str, last_id: str) -> None:
        self.key = key
        self.last_id = last_id
        self.inbox: asyncio.Queue[list[Entry] | BaseException] = asyncio.Queue()


class StreamHub:
    def __init__(self, redis: Redis, outage_s: float = 30.0) -> None:
        self.redis = redis
        self.outage_s = outage_s
        self.down_since: float | None = None  # monotonic: Redis unreachable since then
        self.back_at = float("-inf")  # monotonic: when Redis last came back
        self.follows: dict[str, list[Follow]] = {}
        self._task: asyncio.Task[None] | None = None
        self._blocked_id: int | None = None  # the hub connection's CLIENT ID while it waits

    async def follow(self, key: str, last_id: str = "0-0") -> Follow:
        f = Follow(key, last_id)
        if key in self.follows and self.down_since is None:
            # The XREAD may be waiting past `last_id` for another follower of this stream, and an
            # interrupt that comes too early leaves it waiting there: what lies between is read
            # for this follower now, so it starts no later than the others.
            if entries := await self.redis.xrange(key, min=f"({last_id}"):
                f.last_id = entries[-1][0].decode()
                f.inbox.put_nowait(entries)
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

    @property
    def steady(self) -> bool:
        """Redis is reachable, and has been for a while (`SETTLE_S`): what it says of workers
        can be trusted (their heartbeats come back within a beat of a restart)."""
        return self.down_since is None and time.monotonic() - self.back_at > SETTLE_S

    async def _interrupt(self) -> None:
        """Cut the XREAD waiting now, so the next one reads the new stream too. The UNBLOCK can
        reach Redis just before the XREAD it means: then it is sent again."""
        if self.down_since is not None:
            return  # the next XREAD, once Redis is back, includes it
        for _ in range(50):
            if self._blocked_id is None:
                return  # between two XREADs: the next one includes the new stream
            if await self.redis.client_unblock(self._blocked_id):
                return
            await asyncio.sleep(0.001)

    async def _run(self) -> None:
        try:
            while self.follows:
                try:
                    await self._read_while_connected()
                except (ConnectionError, TimeoutError, OSError) as e:
                    self._blocked_id = None
                    now = time.monotonic()
                    if self.down_since is None:
                        self.down_since = now
                        log.warning("Redis unreachable (%r): streams wait up to %.0f s", e,
                                    self.outage_s)
                    if now - self.down_since >= self.outage_s:
                        raise Unavailable(f"Redis has been unreachable for {self.outage_s:.0f} s",
                                          code="redis_unavailable") from e
                    await asyncio.sleep(RECONNECT_S)
        except Exception as e:  # every follower hears it, as its own XREAD would
            log.warning("stream hub stopped: %r", e)
            for fs in self.follows.values():
                for f in fs:
                    f.inbox.put_nowait(e)
            self.follows.clear()
        finally:
            self._task = None
            self._blocked_id = None
            self.down_since = None

    async def _read_while_connected(self) -> None:
        conn = Redis(connection_pool=self.redis.connection_pool, single_connection_client=True)
        try:
            conn_id = await conn.client_id()
            if self.down_since is not None:
                log.warning("Redis is back after %.1f s: streams read on",
                            time.monotonic() - self.down_since)
                self.down_since, self.back_at = None, time.monotonic()
            while self.follows:
                streams = {key: min((f.last_id for f in fs), key=entry_parts)
                           for key, fs in self.follows.items()}
                self._blocked_id = conn_id
                try:
                    got = await conn.xread(streams, count=COUNT, block=BLOCK_MS)  # type: ignore[arg-type]
                finally:
                    self._blocked_id = None
                for key, entries in got or []:
                    for f in list(self.follows.get(key.decode(), ())):
                        new = [e for e in entries if entry_parts(e[0]) > entry_parts(f.last_id)]
                        if new:
                            f.last_id = new[-1][0].decode()
                            f.inbox.put_nowait(new)
        finally:
            with contextlib.suppress(Exception):
                await conn.aclose()
