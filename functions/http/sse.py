"""The one Server-Sent Events encoder: events with ids, keep-alive pings, error frames, the end."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from quart import Response

from shared.errors import FerryError

log = logging.getLogger(__name__)

PING = b": ping\n\n"


@dataclass
class Event:
    data: dict[str, Any] | str
    id: str | None = None
    name: str | None = None  # `event:` line; chat and text completions use none

    def encode(self) -> bytes:
        head = f"id: {self.id}\n".encode() if self.id else b""
        if self.name:
            head += f"event: {self.name}\n".encode()
        body = self.data.encode() if isinstance(self.data, str) else orjson.dumps(self.data)
        return head + b"data: " + body + b"\n\n"


DONE = Event("[DONE]")

# What a stream's source yields: an event, events that arrived together (one write for all:
# each write costs the web process more than the bytes in it), or None for 'nothing yet'.
Item = Event | list[Event] | None


async def encode(
    events: AsyncIterator[Item], keepalive_s: float, *, done: Event | None = DONE,
    error_name: str | None = None,
) -> AsyncIterator[bytes]:
    """Encode events; `None` means 'nothing yet', answered by a ping when idle.

    A failure after the 200 becomes one error frame; the stream ends with `done`, if any (the
    Responses API has none).
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
            yield item.encode() if isinstance(item, Event) else b"".join(e.encode() for e in item)
    except FerryError as e:
        yield Event(e.to_dict(), name=error_name).encode()
    except Exception:
        log.exception("stream failed")
        yield Event(FerryError("The stream failed on the server").to_dict(), name=error_name).encode()
    if done is not None:
        yield done.encode()


async def respond_after_first(
    events: AsyncIterator[Item], keepalive_s: float, **encoding: Any
) -> Response:
    """Commit to 200 only once the first event is in: early failures stay plain HTTP errors."""
    first = None
    async for item in events:  # exceptions raised here become ordinary HTTP errors
        if item is not None:
            first = item
            break

    async def rest() -> AsyncIterator[Item]:
        if first is not None:
            yield first
        async for item in events:
            yield item

    return response(encode(rest(), keepalive_s, **encoding))


def response(body: AsyncIterator[bytes]) -> Response:
    resp = Response(
        body,
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    resp.timeout = None  # a stream lasts as long as the generation
    return resp
