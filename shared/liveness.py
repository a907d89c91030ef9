"""Worker heartbeats: workers write them, handlers read them to tell live workers from dead ones."""

from __future__ import annotations

import socket
import time

import orjson
from pydantic import BaseModel
from redis.asyncio import Redis

from shared import keys


class WorkerInfo(BaseModel):
    id: str
    host: str = socket.gethostname()
    pid: int
    device: str  # "cpu", "gpu:N", or "auto" (whatever llama.cpp finds)
    model: str
    jobs_in_flight: int = 0
    memory_total: int = 0  # bytes, host memory
    memory_free: int = 0
    beat_at: float = 0.0  # unix time of the last heartbeat


def host_memory() -> tuple[int, int]:
    """(total, available) bytes from /proc/meminfo; (0, 0) where there is none."""
    try:
        lines = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
    except OSError:
        return 0, 0
    kib = {k: int(v.split()[0]) * 1024 for k, v in lines.items() if v.strip()}
    return kib.get("MemTotal", 0), kib.get("MemAvailable", 0)


async def beat(redis: Redis, info: WorkerInfo, ttl_s: float) -> None:
    """Say this worker is alive for the next `ttl_s` seconds."""
    info.memory_total, info.memory_free = host_memory()
    info.beat_at = time.time()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.worker(info.id), info.model_dump_json(), px=int(ttl_s * 1000))
        pipe.sadd(keys.model_workers(info.model), info.id)
        await pipe.execute()


async def leave(redis: Redis, info: WorkerInfo) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.worker(info.id))
        pipe.srem(keys.model_workers(info.model), info.id)
        await pipe.execute()


async def live_workers(redis: Redis, model: str) -> list[WorkerInfo]:
    """Workers serving `model` whose heartbeat has not expired; dead ones are pruned."""
    ids = sorted(m.decode() for m in await redis.smembers(keys.model_workers(model)))
    if not ids:
        return []
    records = await redis.mget([keys.worker(i) for i in ids])
    dead = [i for i, r in zip(ids, records, strict=True) if r is None]
    if dead:
        await redis.srem(keys.model_workers(model), *dead)
    return [WorkerInfo.model_validate(orjson.loads(r)) for r in records if r is not None]


async def is_alive(redis: Redis, worker_id: str) -> bool:
    return bool(await redis.exists(keys.worker(worker_id)))
