"""Connecting to Redis the way both sides need: arq's pool with orjson instead of pickle."""

from __future__ import annotations

from typing import Any

import orjson
from arq.connections import ArqRedis, RedisSettings, create_pool


def serialize(obj: Any) -> bytes:
    # `default=repr` keeps arq's failure results (exception objects) from breaking serialisation.
    return orjson.dumps(obj, default=repr)


def deserialize(raw: bytes) -> Any:
    return orjson.loads(raw)


def redis_settings(url: str) -> RedisSettings:
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = 2
    return settings


async def connect(url: str) -> ArqRedis:
    """An arq pool (a `redis.asyncio.Redis`) that enqueues jobs as JSON."""
    return await create_pool(
        redis_settings(url), job_serializer=serialize, job_deserializer=deserialize
    )
