"""Anthropic's error shape, `{"type": "error", "error": {"type", "message"}}`, with its types by
status, for the Messages routes alone (every other route keeps OpenAI's)."""

from __future__ import annotations

from typing import Any

from shared.errors import FerryError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 409: "invalid_request_error",
         413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
         529: "overloaded_error"}
PATHS = {f"{prefix}/messages{tail}" for prefix in ("/v1", "/api/v1")
         for tail in ("", "/count_tokens")}


def is_anthropic(path: str) -> bool:
    """Anthropic's routes alone (a thread's `/messages` is OpenAI's)."""
    return path.rstrip("/") in PATHS


def body(error: FerryError) -> dict[str, Any]:
    kind = TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    message = f"{error.param}: {error.message}" if error.param and error.param not in \
        error.message else error.message
    return {"type": "error", "error": {"type": kind, "message": message}}
