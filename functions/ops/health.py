"""`/health`: is this web process, its Redis and at least one worker alive."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel
from quart import Blueprint
from redis.exceptions import RedisError

from functions.context import state
from functions.http.openapi import operation
from shared.fleet import liveness
from shared.registry import models


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    timestamp: str
    reason: str | None = None
    workers: dict[str, int] = {}
    persistence: str | None = None
    warning: str | None = None


bp = Blueprint("health", __name__)


@bp.get("/health")
@operation("Liveness: this process, Redis and a worker", response=Health)
async def health() -> Any:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    redis = state().redis
    try:
        await redis.ping()
        workers = {
            r.id: len(await liveness.live_workers(redis, r.id))
            for r in await models.all_models(redis)
        }
    except (RedisError, OSError) as e:
        return {"status": "unavailable", "reason": f"redis unreachable: {e}", "timestamp": now}, 503
    if not any(workers.values()):
        return {"status": "unavailable", "reason": "no live worker", "timestamp": now}, 503
    body = {"status": "ok", "timestamp": now, "workers": workers,
            "persistence": await persistence(redis)}
    if body["persistence"] == "off":
        body["warning"] = ("Redis keeps nothing on disk: threads, messages and assistants are "
                           "lost when it restarts (enable appendonly)")
    return body


async def persistence(redis: Any) -> str:
    """How Redis keeps data on disk: aof, rdb, both, off, or unknown (CONFIG refused)."""
    try:
        aof = (await redis.config_get("appendonly")).get("appendonly") == "yes"
        rdb = bool((await redis.config_get("save")).get("save"))
    except RedisError:
        return "unknown"
    return "+".join(kind for kind, on in (("aof", aof), ("rdb", rdb)) if on) or "off"
