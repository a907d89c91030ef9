"""Which worker a model starts on: a pure choice over the workers' heartbeats.

A worker with the model already loaded wins. Otherwise the worker with the most room that has a
free slot and free memory for it; failing that, the worker where unloading its least recently used
idle models makes room. A model larger than every worker's capacity cannot start anywhere (507);
one that could fit but finds every worker full of busy models must wait (503).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import InsufficientMemory, NoWorker, Unavailable
from shared.fleet.liveness import WorkerInfo


@dataclass(frozen=True)
class Placement:
    worker: WorkerInfo
    evict: list[str]  # models the worker unloads first, least recently used first
    already: bool = False  # the worker holds the model now


def choose(workers: list[WorkerInfo], model: str, need: int) -> Placement:
    if not workers:
        raise NoWorker("No worker is running; start one with `ferry worker`")
    for w in workers:
        if model in w.model_ids:
            return Placement(w, [], already=True)
    if all(need > w.capacity for w in workers):
        largest = max(w.capacity for w in workers)
        raise InsufficientMemory(
            f"Model '{model}' needs about {need / 2**20:.0f} MiB; the largest worker has "
            f"{largest / 2**20:.0f} MiB", param="model")
    roomy = [w for w in workers if len(w.models) < w.max_models and w.used + need <= w.capacity]
    if roomy:
        return Placement(max(roomy, key=lambda w: w.capacity - w.used), [])
    options = [(w, evict) for w in workers if (evict := _evictions(w, need)) is not None]
    if not options:
        raise Unavailable(f"Every worker is busy with other models; retry '{model}' shortly",
                          code="workers_busy")
    # Fewest models unloaded, then the one whose models went unused longest.
    worker, evict = min(options, key=lambda o: (len(o[1]), _last_used(o[0], o[1])))
    return Placement(worker, evict)


def _evictions(w: WorkerInfo, need: int) -> list[str] | None:
    """Idle models to unload, oldest first, until `need` fits in a free slot; None if it can't."""
    if need > w.capacity:
        return None
    used, count, evict = w.used, len(w.models), []
    for m in sorted((m for m in w.models if m.jobs_in_flight == 0), key=lambda m: m.last_used):
        if count < w.max_models and used + need <= w.capacity:
            break
        evict.append(m.id)
        used, count = used - m.need, count - 1
    return evict if count < w.max_models and used + need <= w.capacity else None


def _last_used(w: WorkerInfo, evict: list[str]) -> float:
    return max((m.last_used for m in w.models if m.id in evict), default=0.0)
