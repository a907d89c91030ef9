"""The worker's side of a job's stream: append messages, and learn whether the client left.

Runs on the engine thread with a blocking Redis client, one round trip per batch of messages.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from shared import keys
from shared.jobs import Delta, Error, Final, encode


class Publisher:
    """Appends a job's messages to its Redis Stream."""

    def __init__(self, client: redis.Redis, job_id: str, ttl_s: int) -> None:
        self.client = client
        self.job_id = job_id
        self.ttl_s = ttl_s

    def send(self, messages: Sequence[Delta | Final | Error]) -> bool:
        """Publish `messages`; returns True when the client has asked the job to stop."""
        stream = keys.stream(self.job_id)
        with self.client.pipeline(transaction=False) as pipe:
            for message in messages:
                pipe.xadd(stream, {"m": encode(message)})
            pipe.expire(stream, self.ttl_s)
            pipe.exists(keys.job_cancel(self.job_id))
            results = pipe.execute()
        return bool(results[-1])
