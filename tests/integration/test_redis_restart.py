"""A stream outlives a Redis restart: Redis is SIGKILLed mid-stream and started again on its port
and append-only file, and the client reads on, every chunk once, the same text as without it.

Each test has its own Redis (appendfsync always), worker and web process, so the kills reach no
other test.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from ferry.redis_server import EmbeddedRedis
from shared import keys
from shared.jobs import entry_number
from tests.helpers import Proc, own_model, sse_events, start_web, start_worker

MODEL = "restarted"
BODY = {"model": MODEL, "temperature": 0, "max_tokens": 120, "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}]}


class Stack:
    def __init__(self, server: EmbeddedRedis, web: Proc, url: str, worker: Proc) -> None:
        self.server, self.web, self.url, self.worker = server, web, url, worker

    restarts = 0

    def restart_redis(self, down_s: float) -> None:
        assert self.server.proc is not None
        self.restarts += 1
        self.server.proc.kill()
        self.server.proc.wait()
        time.sleep(down_s)
        self.server.start()


def stack(env: dict[str, str], tmp: Path, outage_s: float, persist: bool = True) -> Iterator[Stack]:
    server = EmbeddedRedis(tmp / "redis", persist=persist, extra=("--appendfsync", "always"))
    url = server.start()
    own = {**env, "REDIS_URL": url, "FERRY_REDIS_OUTAGE_S": str(outage_s),
           "FERRY_STREAM_INTERVAL_MS": "0", "FERRY_HEARTBEAT_TTL_S": "3"}
    worker = web = None
    try:
        worker = start_worker(own, str(own_model(tmp, MODEL)), tmp / "worker.log")
        web, base = start_web(own, tmp / "web.log")
        yield Stack(server, web, base, worker)
    finally:
        for proc in (web, worker):
            if proc is not None:
                proc.stop()
        server.stop()


@pytest.fixture
def patient(env: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    yield from stack(env, tmp_path, outage_s=30)


@pytest.fixture
def hasty(env: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    yield from stack(env, tmp_path, outage_s=3)


@pytest.fixture
def forgetful(env: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    """A Redis that keeps nothing on disk: it comes back empty."""
    yield from stack(env, tmp_path, outage_s=30, persist=False)


def read(url: str, kill_after: int | None = None, on_kill: Any = None
         ) -> tuple[list[str | None], list[dict[str, Any]]]:
    """The stream's event ids and data; `on_kill` runs after the `kill_after`-th content chunk."""
    ids: list[str | None] = []
    datas: list[dict[str, Any]] = []
    seen = 0
    with httpx.Client(base_url=url, timeout=120) as client, \
            client.stream("POST", "/v1/chat/completions", json=BODY) as r:
        assert r.status_code == 200, r.read()
        for event_id, data in sse_events(r.iter_lines()):
            if data == "[DONE]":
                break
            ids.append(event_id)
            datas.append(orjson.loads(data))
            if datas[-1].get("choices") and datas[-1]["choices"][0]["delta"].get("content"):
                seen += 1
                if seen == kill_after:
                    on_kill()
    return ids, datas


def text(datas: list[dict[str, Any]]) -> str:
    return "".join(d["choices"][0]["delta"].get("content") or "" for d in datas if d.get("choices"))


def test_a_stream_completes_across_a_redis_restart(patient: Stack) -> None:
    _, calm = read(patient.url)
    ids, datas = read(patient.url, kill_after=5, on_kill=lambda: patient.restart_redis(2))
    assert patient.restarts == 1  # Redis went down mid-stream
    assert "Redis is back: wrote what waited" in patient.worker.log.read_text()
    assert "error" not in datas[-1], datas[-1]
    assert text(datas) == text(calm) and len(text(calm)) > 100
    numbers = [entry_number(i) for i in ids if i]
    assert numbers == sorted(set(numbers)), "a chunk came twice, or out of order"
    assert datas[-1]["usage"]["completion_tokens"] == calm[-1]["usage"]["completion_tokens"]
    finishes = [d["choices"][0]["finish_reason"] for d in datas if d.get("choices")]
    assert finishes[-1] == "length"
    # what the worker wrote while Redis was away is in the stream once, in order
    job = datas[0]["id"].removeprefix("chatcmpl-")
    entries = redis.Redis.from_url(patient.server.url).xrange(keys.stream(job))
    assert [entry_number(e) for e, _ in entries] == list(range(1, len(entries) + 1))


def test_a_redis_outage_past_the_limit_ends_the_stream_with_an_error(hasty: Stack) -> None:
    started = time.monotonic()
    _, datas = read(hasty.url, kill_after=3, on_kill=lambda: hasty.restart_redis(8))
    assert hasty.restarts == 1
    assert datas[-1]["error"]["code"] == "redis_unavailable", datas[-1]
    assert time.monotonic() - started < 30
    # the worker stopped generating into nothing: its sequence is free once Redis is back
    rds = redis.Redis.from_url(hasty.server.url)
    deadline = time.monotonic() + 15
    while True:
        beats = [orjson.loads(b) for k in rds.scan_iter(keys.worker("*")) if (b := rds.get(k))]
        if beats and all(b["jobs_in_flight"] == 0 for b in beats):
            break
        assert time.monotonic() < deadline, beats
        time.sleep(0.2)
    assert "Redis unreachable for" in hasty.worker.log.read_text()


def test_a_stream_whose_entries_redis_lost_ends_with_an_error_not_a_gap(forgetful: Stack) -> None:
    """Entries the web process had not relayed yet are lost with Redis' data: the web process is
    stopped (SIGSTOP) while the worker writes on, then Redis restarts empty."""
    def lose_unrelayed() -> None:
        os.kill(forgetful.web.p.pid, signal.SIGSTOP)
        try:
            time.sleep(0.5)  # the worker writes entries the web process does not read
            forgetful.restart_redis(1)
        finally:
            os.kill(forgetful.web.p.pid, signal.SIGCONT)

    ids, datas = read(forgetful.url, kill_after=5, on_kill=lose_unrelayed)
    assert forgetful.restarts == 1
    assert datas[-1]["error"]["code"] == "stream_lost", datas[-1]
    numbers = [entry_number(i) for i in ids if i]
    assert numbers == list(range(1, len(numbers) + 1))  # what came before the loss, all of it


def test_a_stream_whose_relayed_entries_redis_lost_goes_on(forgetful: Stack) -> None:
    """Redis restarts empty, but the web process had relayed every entry it held: the worker
    writes the rest, and nothing the client needs is missing."""
    _, calm = read(forgetful.url)
    ids, datas = read(forgetful.url, kill_after=5, on_kill=lambda: forgetful.restart_redis(1))
    assert forgetful.restarts == 1
    numbers = [entry_number(i) for i in ids if i]
    assert numbers == sorted(set(numbers))
    assert "error" not in datas[-1] or datas[-1]["error"]["code"] == "stream_lost", datas[-1]
    if "error" not in datas[-1]:
        assert text(datas) == text(calm)
