"""Request bodies and query strings into request models, or a 400 naming the parameter."""

from __future__ import annotations

from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from quart import request

from functions.context import state
from shared.errors import InvalidRequest, PayloadTooLarge

M = TypeVar("M", bound=BaseModel)


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


def invalid(e: ValidationError) -> InvalidRequest:
    first = e.errors()[0]
    loc = [p for p in first["loc"] if not _is_union_tag(p)]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":  # as OpenAI words it
        return InvalidRequest(f"Unknown parameter: '{param}'.", param=param,
                              code="unknown_parameter")
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
