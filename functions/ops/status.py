"""`/status`: the API, Redis, each model (where it is loaded, queue depth), every worker, and the
login provider when one is configured."""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import BaseModel
from quart import Blueprint
from redis.exceptions import RedisError

from functions.context import state
from functions.http.openapi import operation
from functions.identity import oidc
from functions.ops.health import persistence
from shared import keys
from shared.fleet import liveness
from shared.registry import models


class Status(BaseModel):
    api_gateway: str
    database: dict[str, Any]
    inference_model: dict[str, dict[str, Any]] = {}
    workers: list[dict[str, Any]] = []
    external_apis: dict[str, Any] = {}


bp = Blueprint("status", __name__)


@bp.get("/status")
@operation("Status of the API, Redis, models, workers and the login provider", response=Status)
async def status() -> Any:
    redis = state().redis
    try:
        await redis.ping()
    except (RedisError, OSError) as e:
        return {"api_gateway": "healthy",
                "database": {"status": "unavailable", "error": str(e)}}, 503
    workers = await liveness.all_workers(redis)
    inference: dict[str, Any] = {}
    for record in await models.all_models(redis):
        holders = [w.id for w in workers if record.id in w.model_ids]
        inference[record.id] = {
            "status": "healthy" if holders else "unavailable",
            "state": "running" if holders else await models.current_state(redis, record),
            "workers": holders,
            "queue_depth": await redis.zcard(keys.queue(record.id)),
        }
    return {
        "api_gateway": "healthy",
        "database": {"status": "healthy", "persistence": await persistence(redis)},
        "inference_model": inference,
        "workers": [w.model_dump() for w in workers],
        "external_apis": await external_apis(),
    }


async def external_apis() -> dict[str, Any]:
    """The one outside service Ferry may call: the OIDC login provider, when configured."""
    settings = state().settings
    if not settings.auth or not oidc.configured(settings):
        return {}
    async with httpx.AsyncClient(timeout=3) as http:
        up = await oidc.reachable(settings, http)
    return {"oidc": {"status": "healthy" if up else "unreachable", "issuer": settings.oidc_issuer}}
