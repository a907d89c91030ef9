"""Worker heartbeats: workers write them, handlers read them to tell live workers from dead ones."""

from __future__ import annotations

import socket
import time
from typing import Any

import orjson
from pydantic import BaseModel, computed_field
from redis.asyncio import Redis

from shared import keys


class ModelUsage(BaseModel):
    """One model a worker holds, as its heartbeat shows it."""

    id: str
    need: int  # estimated bytes it takes (`shared.models.need_bytes`)
    last_used: float  # unix time its last job ended (or it was loaded)
    jobs_in_flight: int = 0
    slots: int = 0  # interactive jobs it runs at once (`FERRY_PARALLEL`)
    batch_slots: int = 0  # batch lines it runs at once with nothing interactive (its sequences)


class WorkerInfo(BaseModel):
    id: str
    host: str = socket.gethostname()
    pid: int
    device: str  # "cpu", "gpu:N", or "auto" (whatever llama.cpp finds)
    backend: str = ""  # the llama.cpp build: "cpu", or e.g. "cuda (sm 900)"
    models: list[ModelUsage] = []
    capacity: int  # bytes of memory this worker may fill with models
    max_models: int  # most models it holds at once
    memory_total: int = 0  # bytes, host memory
    memory_free: int = 0
    beat_at: float = 0.0  # unix time of the last heartbeat
    draining: bool = False  # stopping: finishes its jobs, takes no new model

    @property
    def model_ids(self) -> list[str]:
        return [m.id for m in self.models]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def used(self) -> int:
        return sum(m.need for m in self.models)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def jobs_in_flight(self) -> int:
        return sum(m.jobs_in_flight for m in self.models)


def host_memory() -> tuple[int, int]:
    """(total, available) bytes from /proc/meminfo; (0, 0) where there is none."""
    try:
        lines = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
    except OSError:
        return 0, 0
    kib = {k: int(v.split()[0]) * 1024 for k, v in lines.items() if v.strip()}
    return kib.get("MemTotal", 0), kib.get("MemAvailable", 0)


async def beat(redis: Redis, info: WorkerInfo, ttl_s: float) -> None:
    """Say this worker, and each model it holds, is alive for the next `ttl_s` seconds."""
    info.memory_total, info.memory_free = host_memory()
    info.beat_at = time.time()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.worker(info.id), info.model_dump_json(), px=int(ttl_s * 1000))
        pipe.sadd(keys.WORKERS, info.id)
        for model in info.model_ids:
            pipe.sadd(keys.model_workers(model), info.id)
        await pipe.execute()


async def drop(redis: Redis, info: WorkerInfo, model: str, ttl_s: float) -> None:
    """The worker no longer holds `model`: handlers stop routing to it at once."""
    info.models = [m for m in info.models if m.id != model]
    async with redis.pipeline(transaction=True) as pipe:
        _forget(pipe, info.id, model)
        await pipe.execute()
    await beat(redis, info, ttl_s)


async def leave(redis: Redis, info: WorkerInfo) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.worker(info.id))
        pipe.srem(keys.WORKERS, info.id)
        for model in info.model_ids:
            _forget(pipe, info.id, model)
        await pipe.execute()


def _forget(pipe: Any, worker_id: str, model: str) -> None:
    """Queue on `pipe`: the worker serves `model` no more, nor holds its caches."""
    pipe.srem(keys.model_workers(model), worker_id)
    pipe.delete(keys.cache_map(model, worker_id))
    pipe.hdel(keys.model_load(model), worker_id)


async def _live(redis: Redis, index: str) -> list[WorkerInfo]:
    """The workers listed in the set `index` whose heartbeat has not expired; dead ones pruned."""
    ids = sorted(m.decode() for m in await redis.smembers(index))
    if not ids:
        return []
    records = await redis.mget([keys.worker(i) for i in ids])
    dead = [i for i, r in zip(ids, records, strict=True) if r is None]
    if dead:
        await redis.srem(index, *dead)
    return [WorkerInfo.model_validate(orjson.loads(r)) for r in records if r is not None]


async def live_workers(redis: Redis, model: str) -> list[WorkerInfo]:
    """Live workers that hold `model` now."""
    return [w for w in await _live(redis, keys.model_workers(model)) if model in w.model_ids]


async def all_workers(redis: Redis) -> list[WorkerInfo]:
    return await _live(redis, keys.WORKERS)


async def is_alive(redis: Redis, worker_id: str) -> bool:
    return bool(await redis.exists(keys.worker(worker_id)))
