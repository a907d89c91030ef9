"""Rate limits in server mode, counted in Redis so every web process shares them exactly.

Fixed windows: an atomic INCR per (scope, caller, window), the key expiring with its window.
Authenticated callers get ``rate_limit_user_per_hour`` requests, and completions and runs are
also held to ``rate_limit_inference_per_minute``; requests without a valid token count against
their IP (``rate_limit_ip_per_hour``), except probes and scrapes (`UNMETERED`). Every response
carries the hourly window's ``X-RateLimit-*`` headers; one over a limit is a 429 with
``Retry-After``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from quart import Response, g, request

from functions.context import state
from functions.identity.auth import identity
from shared import keys
from shared.errors import RateLimited

# INCR, and start the window's expiry with its first request.
_COUNT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""
INFERENCE_SUFFIXES = ("/chat/completions", "/completions", "/runs", "/responses", "/embeddings")
UNMETERED = ("/health", "/metrics")  # load balancers' probes and Prometheus' scrapes


@dataclass(frozen=True)
class Window:
    limit: int
    remaining: int
    reset: int  # unix time the window ends


async def apply() -> None:
    """`before_request`, after authentication."""
    settings = state().settings
    if not settings.auth or request.path in UNMETERED:
        return
    who = identity()
    if who is None:
        g.rate_window = await _count("ip", request.remote_addr or "unknown",
                                     settings.rate_limit_ip_per_hour, 3600)
        return
    g.rate_window = await _count("user", who.user_id, settings.rate_limit_user_per_hour, 3600)
    if request.method == "POST" and (request.path.endswith(INFERENCE_SUFFIXES)
                                     or request.path in ("/v1/messages", "/api/v1/messages")):
        await _count("inference", who.user_id, settings.rate_limit_inference_per_minute, 60)


async def add_headers(response: Response) -> Response:
    """`after_request`: the hourly window, on every response (errors included)."""
    window: Window | None = g.get("rate_window")
    if window is not None:
        response.headers["X-RateLimit-Limit"] = str(window.limit)
        response.headers["X-RateLimit-Remaining"] = str(window.remaining)
        response.headers["X-RateLimit-Reset"] = str(window.reset)
    return response


async def _count(scope: str, who: str, limit: int, period_s: int) -> Window | None:
    if limit <= 0:
        return None
    now = time.time()
    window = int(now // period_s)
    reset = (window + 1) * period_s
    n = int(await state().redis.eval(_COUNT, 1, keys.rate(scope, who, window),
                                     str(period_s * 1000 + 5000)))
    counted = Window(limit, max(limit - n, 0), reset)
    if n > limit:
        g.rate_window = g.get("rate_window") or counted
        raise RateLimited(f"Rate limit reached: {limit} requests per {period_s // 60} minutes "
                          f"({scope}); retry after the window resets", max(int(reset - now), 1))
    return counted
