"""The worker's side of a job's stream: append messages, and learn whether the client left."""

from __future__ import annotations

from redis.asyncio import Redis

from shared import keys
from shared.jobs import Delta, Error, Final, encode


class Publisher:
    """Appends a job's messages to its Redis Stream, one round trip per batch."""

    def __init__(self, redis: Redis, job_id: str, ttl_s: int) -> None:
        self.redis = redis
        self.job_id = job_id
        self.ttl_s = ttl_s

    async def send(self, messages: list[Delta | Final | Error]) -> bool:
        """Publish `messages`; returns True when the client has asked the job to stop."""
        stream = keys.stream(self.job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for message in messages:
                pipe.xadd(stream, {"m": encode(message)})
            pipe.expire(stream, self.ttl_s)
            pipe.exists(keys.job_cancel(self.job_id))
            results = await pipe.execute()
        return bool(results[-1])

    async def cancelled(self) -> bool:
        return bool(await self.redis.exists(keys.job_cancel(self.job_id)))
