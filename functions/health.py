"""`/health`: is this web process, its Redis and at least one worker alive."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from quart import Blueprint
from redis.exceptions import RedisError

from functions.state import state
from shared import liveness, models

bp = Blueprint("health", __name__)


@bp.get("/health")
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
    return {"status": "ok", "timestamp": now, "workers": workers}
