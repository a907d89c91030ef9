"""What every handler reaches for: the app's Redis pool and settings, and body parsing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from arq.connections import ArqRedis
from pydantic import BaseModel, ValidationError
from quart import current_app, request

from functions.queue.hub import StreamHub
from shared.errors import InvalidRequest, PayloadTooLarge, Unauthorized
from shared.settings import Settings

M = TypeVar("M", bound=BaseModel)
LOCAL_USER = "local"


@dataclass
class FerryState:
    """Built by `create_app`, filled in `before_serving`, kept in ``app.extensions['ferry']``."""

    settings: Settings
    redis: ArqRedis = field(init=False)
    tokenizers: dict[str, Any] = field(default_factory=dict)
    downloads: set[asyncio.Task[None]] = field(default_factory=set)  # running in this process
    batches: Any = field(init=False)  # functions.batch_runner.BatchRunner, once serving
    streams: StreamHub = field(init=False)  # one XREAD for every stream this process relays


def state() -> FerryState:
    return current_app.extensions["ferry"]


async def parse_body(model: type[M]) -> M:
    """The request body as `model`, or a 400 that names the offending parameter."""
    raw = await request.get_data()
    if len(raw) > state().settings.max_body_bytes:  # a body sent without Content-Length
        raise PayloadTooLarge("The request body is too large")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"The body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise InvalidRequest("The body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid(e) from e


def parse_query(model: type[M]) -> M:
    """Query-string parameters as `model`, or a 400 naming the offending one."""
    try:
        return model.model_validate(request.args.to_dict())
    except ValidationError as e:
        raise invalid(e) from e


def caller() -> str:
    """Who is asking: the owner recorded on what they store. One local user while auth is off."""
    from functions.identity.auth import identity

    who = identity()
    if who is None:
        raise Unauthorized("This endpoint needs a bearer token")
    return who.user_id


def invalid(e: ValidationError) -> InvalidRequest:
    first = e.errors()[0]
    loc = [p for p in first["loc"] if not _is_union_tag(p)]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequest(
        f"Invalid value for '{param}': {message}" if param else message,
        param=param or None,
        code="invalid_value" if first["type"] != "missing" else "missing_required_parameter",
    )


def _is_union_tag(part: int | str) -> bool:
    """pydantic names the union member it tried ('str', 'list[TextPart]'): not a parameter."""
    return isinstance(part, str) and (
        "[" in part or part[:1].isupper() or part in {"str", "int", "float", "bool", "none"}
    )
