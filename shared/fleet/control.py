"""Starting and stopping models: the handler's side of a worker's control list.

A command goes on the chosen worker's list (``keys.control``); the worker acts on it and pushes an
`CommandResult` onto the command's reply list, which the caller waits on while checking the worker's
heartbeat, so a worker that dies mid-load fails the start instead of hanging it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel
from redis.asyncio import Redis

from shared import keys
from shared.errors import Conflict, Unavailable, WireError, WorkerLost
from shared.fleet import liveness
from shared.fleet.liveness import WorkerInfo
from shared.fleet.placement import choose
from shared.registry import models
from shared.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 1  # how long one wait on a reply blocks before the worker's heartbeat is checked


class Command(BaseModel):
    op: Literal["load", "unload"]
    model: str
    evict: list[str] = []  # models to unload before loading
    reply_to: str


class CommandResult(BaseModel):
    """A worker's answer to a command: done, or the error it failed with."""

    error: WireError | None = None


async def ask(redis: Redis, worker_id: str, op: Literal["load", "unload"], model: str,
              timeout_s: float, evict: list[str] | None = None) -> None:
    """Send one command and wait for its answer; a failed answer raises the worker's error."""
    command = Command(op=op, model=model, evict=evict or [], reply_to=keys.reply(uuid.uuid4().hex))
    async with redis.pipeline(transaction=True) as pipe:
        pipe.rpush(keys.control(worker_id), command.model_dump_json())
        pipe.expire(keys.control(worker_id), int(timeout_s) + 60)
        await pipe.execute()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = await redis.blpop([command.reply_to], timeout=POLL_S)
        if got is not None:
            result = CommandResult.model_validate_json(got[1])
            if result.error is not None:
                raise result.error.exception()
            return
        if not await liveness.is_alive(redis, worker_id):
            raise WorkerLost(f"The worker asked to {op} '{model}' stopped responding")
    raise Unavailable(f"The worker did not {op} '{model}' within {timeout_s:.0f}s", code="timeout")


async def start(redis: Redis, settings: Settings, model: str) -> WorkerInfo:
    """Load `model` on a worker (or find the one that has it); one start per model at a time."""
    record = await models.get_or_bundled(redis, model, settings.models_path, embeds=None)
    if record.state in ("downloading", "error"):
        raise Conflict(f"Model '{model}' is {record.state}; it cannot start", param="model")
    lock = keys.model_starting(model)
    deadline = time.monotonic() + settings.load_timeout_s
    while not await redis.set(lock, b"1", nx=True, ex=int(settings.load_timeout_s) + 5):
        if live := await liveness.live_workers(redis, model):  # another caller is starting it
            return live[0]
        if time.monotonic() > deadline:
            raise Unavailable(f"Model '{model}' is still loading; retry shortly", code="timeout")
        await asyncio.sleep(0.1)
    try:
        need = models.need_bytes(record, settings.ctx_len, settings.n_batch, settings.sequences)
        workers = [w for w in await liveness.all_workers(redis) if not w.draining]
        placement = choose(workers, model, need)
        if not placement.already:
            log.info("starting %s on worker %s (unloading %s)", model, placement.worker.id,
                     placement.evict or "nothing")
            await ask(redis, placement.worker.id, "load", model, settings.load_timeout_s,
                      evict=placement.evict)
        if record.state == "stopped":
            await models.set_state(redis, model, "downloaded")
        return placement.worker
    finally:
        await redis.delete(lock)


async def stop(redis: Redis, settings: Settings, model: str) -> None:
    """Unload `model` from every worker that holds it; it stays registered, `stopped`."""
    record = await models.get(redis, model)
    for worker in await liveness.live_workers(redis, model):
        await ask(redis, worker.id, "unload", model, settings.load_timeout_s)
    if record.state == "downloaded":
        await models.set_state(redis, model, "stopped")


async def delete(redis: Redis, settings: Settings, model: str) -> None:
    """Stop the model, forget it, and remove its folder if Ferry put it there (download, import)."""
    record = await models.get(redis, model)
    await stop(redis, settings, model)
    folder = settings.models_path / model
    if folder.is_dir() and (record.source_url or (
            record.path and Path(record.path).absolute().is_relative_to(folder.absolute()))):
        shutil.rmtree(folder, ignore_errors=True)  # links of an import go, never their targets
    await models.forget(redis, model)
