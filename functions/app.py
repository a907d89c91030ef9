"""The Quart app factory: blueprints under both path styles, one error renderer."""

from __future__ import annotations

import logging
from typing import Any

from quart import Quart, request
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from functions.anthropic import errors as anthropic_errors
from functions.anthropic import messages
from functions.assistants import assistants, conversations, runs, threads
from functions.batch import batches, files
from functions.batch.runner import BatchRunner
from functions.context import LOCAL_USER, FerryState
from functions.http import cors, openapi
from functions.identity import auth, login, ratelimit, users
from functions.openai import completions, embeddings, models_api, tokenize
from functions.ops import health, metrics, status
from functions.queue.hub import StreamHub
from functions.responses import responses
from shared.errors import FerryError, MethodNotAllowed, NotFound, PayloadTooLarge, Unavailable
from shared.redis import connect
from shared.settings import Settings

log = logging.getLogger(__name__)

# Jan's local server uses /v1, Jan Server /api/v1: both reach the same handlers.
API_PREFIXES = ("/v1", "/api/v1")
UPLOADS = {f"files_{p.strip('/').replace('/', '_')}.upload" for p in API_PREFIXES}


def create_app(settings: Settings) -> Quart:
    app = Quart("ferry", static_folder=None)
    # Uploads may be large; every other body is held to max_body_bytes (`small_bodies`).
    app.config["MAX_CONTENT_LENGTH"] = max(settings.max_body_bytes, settings.files_max_bytes + 2**16)
    st = FerryState(settings=settings)
    app.extensions["ferry"] = st

    @app.before_serving
    async def open_redis() -> None:
        if settings.redis_url is None:
            raise RuntimeError("REDIS_URL is not set: `ferry web` needs a Redis (or use `ferry serve`)")
        st.redis = await connect(settings.redis_url)
        await assistants.ensure_default(st.redis, LOCAL_USER)
        st.batches = BatchRunner(st)
        st.streams = StreamHub(st.redis, settings.redis_outage_s)

    @app.after_serving
    async def close_redis() -> None:
        for task in list(st.downloads):  # the .part file stays; a new download resumes it
            task.cancel()
        await st.batches.close()  # a batch's lease lapses: another process (or this one) goes on
        await st.streams.close()
        await st.redis.aclose()

    for prefix in API_PREFIXES:
        name = prefix.strip("/").replace("/", "_")
        for bp in (completions.bp, models_api.bp, tokenize.bp, assistants.bp, threads.bp, runs.bp,
                   conversations.bp, status.bp, users.bp, files.bp, batches.bp, responses.bp,
                   messages.bp, embeddings.bp):
            app.register_blueprint(bp, url_prefix=prefix, name=f"{bp.name}_{name}")
    app.register_blueprint(tokenize.bp)  # /extras/... as in Jan's local API
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(login.bp)  # /auth/google, as in Jan Server
    app.register_blueprint(openapi.bp)  # /openapi.json and /api/swagger/

    @app.before_request
    async def small_bodies() -> None:
        if request.endpoint not in UPLOADS and (request.content_length or 0) > settings.max_body_bytes:
            raise PayloadTooLarge("The request body is too large")

    @app.before_request
    async def who_is_calling() -> None:
        try:
            await auth.authenticate()
        finally:
            await ratelimit.apply()

    app.after_request(ratelimit.add_headers)
    app.after_request(metrics.count)
    app.after_request(cors.add_headers)

    app.register_error_handler(FerryError, _render)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(RedisError, _redis_down)
    app.register_error_handler(Exception, _unexpected)
    return app


def _render(error: FerryError) -> Any:
    if anthropic_errors.is_anthropic(request.path):  # Anthropic's clients read their own shape
        return anthropic_errors.body(error), error.status, error.headers()
    return error.to_dict(), error.status, error.headers()


def _http_error(error: HTTPException) -> Any:
    status = error.code or 500
    cls = {404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge}.get(status)
    if cls is None:
        return FerryError(error.description or error.name).to_dict(), status
    messages = {
        404: "No such endpoint",
        405: "Method not allowed for this endpoint",
        413: "The request body is too large",
    }
    return _render(cls(messages[status]))


def _redis_down(error: RedisError) -> Any:
    log.error("redis error: %s", error)
    return _render(Unavailable("The queue (Redis) is unreachable; retry shortly"))


def _unexpected(error: Exception) -> Any:
    log.exception("unhandled error", exc_info=error)
    return _render(FerryError("The server had an error while processing your request"))
