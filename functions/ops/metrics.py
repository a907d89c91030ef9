"""`GET /metrics` in Prometheus' text format, and the per-request counter feeding it."""

from __future__ import annotations

import logging

from quart import Blueprint, Response, request
from redis.exceptions import RedisError

from functions.context import state
from functions.http.openapi import operation
from shared import telemetry

bp = Blueprint("metrics", __name__)
log = logging.getLogger(__name__)


@bp.get("/metrics")
@operation("Prometheus metrics", media="text/plain")
async def scrape() -> Response:
    body = await telemetry.render(state().redis)
    return Response(body, content_type="text/plain; version=0.0.4; charset=utf-8")


async def count(response: Response) -> Response:
    """`after_request`: one request by its route template (never the raw path: ids would explode
    the label set) and status."""
    route = request.url_rule.rule if request.url_rule else "unmatched"
    try:
        await telemetry.count_request(state().redis, request.method, route, response.status_code)
    except (RedisError, OSError):  # Redis down: the request's own answer matters more
        log.debug("request not counted", exc_info=True)
    return response
