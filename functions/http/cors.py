"""CORS: browsers on the origins in ``FERRY_CORS_ORIGINS`` (comma-separated, or ``*``) may call
the API; none may by default. Preflights are answered by Quart's automatic OPTIONS route."""

from __future__ import annotations

from quart import Response, request

from functions.context import state

EXPOSED = "X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After"


async def add_headers(response: Response) -> Response:
    origin = request.headers.get("Origin")
    allowed = {o.strip() for o in state().settings.cors_origins.split(",") if o.strip()}
    if not origin or not (origin in allowed or "*" in allowed):
        return response
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Vary"] = "Origin"
    response.headers["Access-Control-Expose-Headers"] = EXPOSED
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = (
            request.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type")
        response.headers["Access-Control-Max-Age"] = "600"
    return response
