"""What a worker process holds for its lifetime, built once in arq's `on_startup`."""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis as SyncRedis
from redis.asyncio import Redis

from shared.liveness import WorkerInfo
from shared.settings import Settings
from workers.engine import Engine


@dataclass
class WorkerState:
    settings: Settings
    redis: Redis
    engine: Engine
    stream_client: SyncRedis  # blocking client the engine thread publishes with
    info: WorkerInfo
