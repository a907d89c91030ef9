"""Checks a batch's input file, line by line, before anything runs.

Each line must be `{custom_id, method: POST, url, body}` with a custom_id unique in the file, the
batch's endpoint as its url and a body that does not stream. Pure: it reads only the chunks it is
given and reports what is wrong as OpenAI's batch errors (`{code, line, message, param}`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from functions.batch.file_store import lines

MAX_ERRORS = 100  # validation errors reported per batch

FIELDS = ("custom_id", "method", "url", "body")


def read_lines(chunks: Iterable[bytes], endpoint: str, max_lines: int
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every request of the input file (its bytes, a chunk at a time), checked. Returns
    (requests, errors): each request is `{custom_id, body, line}`, each error a `line_error`.
    Lines are numbered from 1, blank ones counted but skipped. Reading stops at the
    `max_lines + 1`-th request (one `too_many_lines` error) or at `MAX_ERRORS` errors."""
    entries: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(lines(chunks), start=1):
        if not raw.strip():
            continue
        if len(entries) >= max_lines:
            errors.append(line_error("too_many_lines", number,
                                     f"A batch may have at most {max_lines} requests"))
            break
        entry, error = check_line(raw, endpoint, seen)
        if error is not None:
            errors.append({**error, "line": number})
            if len(errors) >= MAX_ERRORS:
                break
        else:
            entries.append({**entry, "line": number})
    return entries, errors


def check_line(raw: bytes, endpoint: str, seen: set[str]
               ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One line: (`{custom_id, body}`, None), or ({}, what is wrong with it, its line None).
    `seen` holds the custom_ids of the lines before; this line's is added once it is found
    well-formed and new, even if a later check fails."""
    def wrong(code: str, message: str, param: str | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        return {}, line_error(code, None, message, param)

    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return wrong("invalid_json_line", "This line is not valid JSON")
    if not isinstance(item, dict):
        return wrong("invalid_request", "Each line must be a JSON object")
    for field in FIELDS:
        if field not in item:
            return wrong("missing_required_parameter", f"Missing '{field}'", field)
    custom_id, body = item["custom_id"], item["body"]
    if not isinstance(custom_id, str) or not custom_id:
        return wrong("invalid_request", "custom_id must be a non-empty string", "custom_id")
    if custom_id in seen:
        return wrong("duplicate_custom_id",
                     f"custom_id '{custom_id[:100]}' appears more than once", "custom_id")
    seen.add(custom_id)
    if item["method"] != "POST":
        return wrong("invalid_method", "method must be POST", "method")
    if item["url"] != endpoint:
        return wrong("mismatched_endpoint",
                     f"url '{str(item['url'])[:100]}' is not the batch's endpoint {endpoint}",
                     "url")
    if not isinstance(body, dict):
        return wrong("invalid_request", "body must be a JSON object", "body")
    if body.get("stream"):
        return wrong("stream_unsupported", "Batch requests cannot stream", "body.stream")
    return {"custom_id": custom_id, "body": body}, None


def first_of_each_model(entries: Iterable[dict[str, Any]]) -> list[tuple[str | None, int]]:
    """`(model, line)` for each model the requests name (None: no model, the default), with the
    first line that names it, in the order they first appear: what to check exists."""
    first: dict[str | None, int] = {}
    for e in entries:
        first.setdefault(e["body"].get("model"), e["line"])
    return list(first.items())


def line_error(code: str, line: int | None, message: str, param: str | None = None
               ) -> dict[str, Any]:
    """One entry of a failed batch's `errors.data`; `line` None when no one line is at fault."""
    return {"code": code, "line": line, "message": message, "param": param}
