"""What one loaded model's job function needs, built when the model loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.asyncio import Redis

from shared.fleet.liveness import ModelUsage
from shared.settings import Settings
from workers.engine.embedder import Embedder
from workers.engine.engine import Engine
from workers.publish import JobOutput, Publisher


@dataclass
class LoadedModel:
    """One model loaded in this worker process, as its jobs see it (arq's `ctx["ferry"]`)."""

    settings: Settings
    redis: Redis
    engine: Engine | Embedder  # a generation model's, or an embedding model's
    publisher: Publisher  # writes every job's stream, off the scheduler thread
    worker_id: str
    usage: ModelUsage  # this model's entry in the worker's heartbeat: jobs in flight, last use
    outputs: set[JobOutput] = field(default_factory=set)  # the jobs in flight, for a drain to end
    # Generation jobs taken and not ended (this worker's load on the model), and their cache
    # map entries, which stay in the map while they run.
    claimed: dict[str, list[str]] = field(default_factory=dict)
    stopping: bool = False  # past the drain deadline: every job ends with `worker_stopping`
