"""Which worker a job should run on, when more than one serves its model.

The queue is the model's, and any worker may take any job; a routed job names the worker it was
sent to (``keys.model_prefer``), other workers leave it to that one for ``FERRY_ROUTE_WAIT_MS``,
and after that whoever is free takes it, so no job waits behind a busy worker while another idles.

The choice, as the SGLang router's cache-aware policy makes it: a job goes to the worker whose
cache map (`shared.fleet.cache_map`) holds a longer start of its prompt than any other worker's,
past the first block, or that holds its session (a client's conversation key); unless that worker
runs ``FERRY_ROUTE_MAX_LOAD`` of its sequences or more, counting the jobs routed to it that it
has not taken yet. Every other job goes to the least-loaded worker below that load, among equals
at random: a first block alone (a system prompt that every conversation shares, held by the worker
that saw it first) would otherwise send every new conversation to one worker while another idles;
every worker soon holds it. If every worker is that loaded, the job is left to whichever frees a
sequence first.

A web process makes one routing decision at a time, each up to its job's place in the queue
(`deciding`), so that the next sees the job routed before it: new conversations arriving together
would otherwise all read the same loads and land on one worker, and their later turns follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import weakref
from collections import Counter
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from redis.asyncio import Redis

from shared import keys
from shared.fleet import cache_map
from shared.fleet.liveness import WorkerInfo
from shared.jobs import EmbeddingJob, GenerationJob, Route
from shared.settings import Settings


@dataclass
class Candidate:
    worker: str
    blocks: int  # of the prompt's blocks its caches hold
    session: bool  # its map holds the job's session
    load: int  # jobs it runs, and jobs routed to it not yet taken
    slots: int  # sequences it generates at once

    def busy(self, max_load: float) -> bool:
        return self.load >= max(1.0, self.slots * max_load)


_decisions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = \
    weakref.WeakKeyDictionary()


def applies(job: GenerationJob | EmbeddingJob, workers: list[WorkerInfo],
            settings: Settings) -> bool:
    """Whether `job` has a route to choose: a chat or completion, not a batch line (it waits
    behind every interactive job anyway), with routing on and two workers or more to choose from."""
    return (isinstance(job, GenerationJob) and not job.background and settings.cache_routing
            and sum(not w.draining for w in workers) >= 2)


def deciding(job: GenerationJob | EmbeddingJob, workers: list[WorkerInfo],
             settings: Settings) -> AbstractAsyncContextManager[object]:
    """Held from choosing `job`'s route until it is queued, where there is a route to choose."""
    if not applies(job, workers, settings):
        return contextlib.nullcontext()
    return _decisions.setdefault(asyncio.get_running_loop(), asyncio.Lock())


async def choose(redis: Redis, job: GenerationJob, workers: list[WorkerInfo],
                 settings: Settings) -> Route | None:
    """The route for `job` among the live `workers` of its model; None where there is no choice
    to make (`applies`)."""
    if not applies(job, workers, settings):
        return None
    workers = [w for w in workers if not w.draining]
    session = cache_map.session_hash(job.session) if job.session else None
    entries = job.prefixes + ([session] if session else [])
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.model_load(job.model))
        pipe.hvals(keys.model_prefer(job.model))
        for w in workers if entries else []:
            pipe.smismember(keys.cache_map(job.model, w.id), entries)
        running, routed, *maps = await pipe.execute()
    pending = Counter(v.decode() for v in routed)
    candidates = []
    for w, found in zip(workers, maps or [[0] * len(entries)] * len(workers), strict=True):
        usage = next(m for m in w.models if m.id == job.model)
        candidates.append(Candidate(
            worker=w.id, blocks=cache_map.longest(found, job.prefixes),
            session=bool(session and found[-1]),
            load=int(running.get(w.id.encode(), 0)) + pending[w.id], slots=usage.slots or 1))
    random.shuffle(candidates)  # equals in everything else share the work
    best = max(candidates, key=lambda c: (c.blocks, c.session, -c.load))
    others = max((c.blocks for c in candidates if c is not best), default=0)
    pinned = best.session or best.blocks > max(others, 1)
    if pinned and not best.busy(settings.route_max_load):
        return Route(worker=best.worker, decision="hit", blocks=best.blocks)
    free = [c for c in candidates if not c.busy(settings.route_max_load)]
    if not free:
        return None  # whichever frees a sequence first
    least = min(free, key=lambda c: c.load)
    return Route(worker=least.worker, decision="busy" if pinned else "miss", blocks=least.blocks)
