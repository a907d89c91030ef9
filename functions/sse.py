"""The one Server-Sent Events encoder: chunks with ids, keep-alive pings, error frames, [DONE]."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from quart import Response

from shared.errors import FerryError

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"


def event(data: dict[str, Any], event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n".encode() if event_id else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


async def encode(
    events: AsyncIterator[tuple[str | None, dict[str, Any]] | None], keepalive_s: float
) -> AsyncIterator[bytes]:
    """Encode `(id, chunk)` pairs; `None` means 'nothing yet', answered by a ping when idle.

    A failure after the 200 becomes one error frame; the stream always ends with [DONE].
    """
    last_sent = time.monotonic()
    try:
        async for item in events:
            now = time.monotonic()
            if item is None:
                if now - last_sent >= keepalive_s:
                    last_sent = now
                    yield PING
                continue
            last_sent = now
            yield event(item[1], item[0])
    except FerryError as e:
        yield event(e.to_dict())
    except Exception:
        log.exception("stream failed")
        yield event(FerryError("The stream failed on the server").to_dict())
    yield DONE


def response(body: AsyncIterator[bytes]) -> Response:
    resp = Response(
        body,
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    resp.timeout = None  # a stream lasts as long as the generation
    return resp
