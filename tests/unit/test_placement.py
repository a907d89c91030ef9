"""Placement is a pure choice over heartbeats; these cases pin down its order of preference."""

from __future__ import annotations

import pytest

from shared.errors import InsufficientMemory, NoWorker, Unavailable
from shared.fleet.liveness import ModelUsage, WorkerInfo
from shared.fleet.placement import choose

GB = 2**30


def worker(wid: str, capacity: int, *models: tuple[str, int, float, int], max_models: int = 3
           ) -> WorkerInfo:
    return WorkerInfo(id=wid, pid=1, device="cpu", capacity=capacity, max_models=max_models,
                      models=[ModelUsage(id=m, need=n, last_used=t, jobs_in_flight=j)
                              for m, n, t, j in models])


def test_a_worker_holding_the_model_wins() -> None:
    ws = [worker("a", 8 * GB), worker("b", 8 * GB, ("m", GB, 0, 0))]
    assert choose(ws, "m", GB).worker.id == "b" and choose(ws, "m", GB).already


def test_most_free_room_with_a_free_slot() -> None:
    ws = [worker("a", 8 * GB, ("x", 6 * GB, 0, 0)), worker("b", 4 * GB),
          worker("c", 16 * GB, ("y", GB, 0, 0), max_models=1)]
    placed = choose(ws, "m", GB)
    assert placed.worker.id == "b" and placed.evict == []


def test_evicts_least_recently_used_idle_models_only() -> None:
    w = worker("a", 4 * GB, ("old", 2 * GB, 10, 0), ("busy", GB, 5, 1), ("new", GB, 20, 0))
    placed = choose([w], "m", 2 * GB)
    assert placed.evict == ["old"]
    assert choose([w], "m", 3 * GB).evict == ["old", "new"]
    with pytest.raises(Unavailable) as e:
        choose([w], "m", 4 * GB)  # would need the busy model's memory too
    assert e.value.status == 503


def test_fewest_evictions_across_workers() -> None:
    a = worker("a", 2 * GB, ("a1", GB, 1, 0), ("a2", GB, 2, 0))
    b = worker("b", 2 * GB, ("b1", 2 * GB, 50, 0))
    assert choose([a, b], "m", 2 * GB).worker.id == "b"


def test_too_large_for_every_worker_and_no_worker() -> None:
    with pytest.raises(InsufficientMemory) as e:
        choose([worker("a", GB), worker("b", 2 * GB)], "m", 3 * GB)
    assert e.value.status == 507 and "2048 MiB" in e.value.message
    with pytest.raises(NoWorker):
        choose([], "m", GB)


def test_an_embedding_models_estimate_counts_vectors_not_logits() -> None:
    from shared.registry.models import COMPUTE_OVERHEAD, ModelRecord, need_bytes

    header = {"size": 45 * 2**20, "kv_bytes_per_token": 9216, "vocab_size": 30522,
              "embedding_length": 384}
    chat = ModelRecord(id="chat", created=0, metadata=header)
    embed = ModelRecord(id="embed", created=0, metadata={**header, "pooling_type": 1})
    assert embed.embeds and not chat.embeds
    assert need_bytes(embed, 512, 512, 8) == 45 * 2**20 + 9216 * 512 + 512 * 384 * 4 + COMPUTE_OVERHEAD
    assert need_bytes(chat, 512, 512, 8) == 45 * 2**20 + 9216 * 512 + 512 * 30522 * 4 + COMPUTE_OVERHEAD
