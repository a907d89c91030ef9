"""Takes up every unfinished batch that no live process drives: the lease loop.

Every web process runs a `BatchRunner`. One process at a time drives a batch (`BatchDriver`), the
holder of its lease in Redis; if that process dies the lease lapses and another (or the same one,
restarted) goes on from the batch's state in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

from redis.exceptions import RedisError

from functions.batch.driver import LEASE_S, BatchDriver
from shared import keys

log = logging.getLogger(__name__)


class BatchRunner:
    def __init__(self, st: Any) -> None:
        self.st = st
        self.id = uuid.uuid4().hex
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.main = asyncio.create_task(self._run())

    async def _run(self) -> None:
        """Take up every unfinished batch no live process is driving."""
        redis = self.st.redis
        while True:
            try:
                for raw in await redis.smembers(keys.BATCHES):
                    batch_id = raw.decode()
                    task = self.tasks.get(batch_id)
                    if (task is None or task.done()) and await redis.set(
                            keys.batch(batch_id, "lease"), self.id, nx=True, ex=LEASE_S):
                        self.tasks[batch_id] = asyncio.create_task(self._drive(batch_id))
            except (RedisError, OSError):
                log.warning("batch runner cannot reach Redis; retrying", exc_info=True)
            await asyncio.sleep(1)

    async def close(self) -> None:
        tasks = [self.main, *self.tasks.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _drive(self, batch_id: str) -> None:
        try:
            await BatchDriver(self.st, batch_id, self.id).run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s: driver failed; another runner takes over", batch_id)
