"""`/status`: the API, Redis, each model (where it is loaded, queue depth) and every worker."""

from __future__ import annotations

from typing import Any

from quart import Blueprint
from redis.exceptions import RedisError

from functions.health import persistence
from functions.state import state
from shared import keys, liveness, models

bp = Blueprint("status", __name__)


@bp.get("/status")
async def status() -> Any:
    redis = state().redis
    try:
        await redis.ping()
    except (RedisError, OSError) as e:
        return {"api_gateway": "healthy",
                "database": {"status": "unavailable", "error": str(e)}}, 503
    inference: dict[str, Any] = {}
    workers: list[dict[str, Any]] = []
    for record in await models.all_models(redis):
        live = await liveness.live_workers(redis, record.id)
        workers += [w.model_dump() for w in live]
        inference[record.id] = {
            "status": "healthy" if live else "unavailable",
            "state": "running" if live else record.state,
            "workers": [w.id for w in live],
            "queue_depth": await redis.zcard(keys.queue(record.id)),
        }
    return {
        "api_gateway": "healthy",
        "database": {"status": "healthy", "persistence": await persistence(redis)},
        "inference_model": inference,
        "workers": workers,
        "external_apis": {},  # Ferry calls none
    }
