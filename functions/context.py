"""What every handler reaches for: the app's Redis pool and settings, and who is calling."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis
from quart import current_app

from functions.queue.hub import StreamHub
from shared.errors import Unauthorized
from shared.settings import Settings

LOCAL_USER = "local"


@dataclass
class FerryState:
    """Built by `create_app`, filled in `before_serving`, kept in ``app.extensions['ferry']``."""

    settings: Settings
    redis: ArqRedis = field(init=False)
    tokenizers: dict[str, Any] = field(default_factory=dict)
    downloads: set[asyncio.Task[None]] = field(default_factory=set)  # running in this process
    batches: Any = field(init=False)  # functions.batch.runner.BatchRunner, once serving
    streams: StreamHub = field(init=False)  # one XREAD for every stream this process relays


def state() -> FerryState:
    return current_app.extensions["ferry"]


def caller() -> str:
    """Who is asking: the owner recorded on what they store. One local user while auth is off."""
    from functions.identity.auth import identity

    who = identity()
    if who is None:
        raise Unauthorized("This endpoint needs a bearer token")
    return who.user_id
