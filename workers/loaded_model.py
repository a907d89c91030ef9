"""What one loaded model's job function needs, built when the model loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.asyncio import Redis

from shared.fleet.liveness import Loaded
from shared.settings import Settings
from workers.engine.engine import Engine
from workers.publish import Answer, Publisher


@dataclass
class WorkerState:
    settings: Settings
    redis: Redis
    engine: Engine
    publisher: Publisher  # writes every job's stream, off the scheduler thread
    worker_id: str
    usage: Loaded  # this model's entry in the worker's heartbeat: jobs in flight, last use
    answers: set[Answer] = field(default_factory=set)  # the jobs in flight, for a drain to end
    stopping: bool = False  # past the drain deadline: every job ends with `worker_stopping`
