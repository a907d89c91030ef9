"""Stopping gently: SIGTERM drains a worker (jobs in flight finish, or end with `worker_stopping`
past the deadline) and a web process (open streams finish); real processes, real signals."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from shared import keys
from tests.helpers import SMOLLM, own_model, sse_events, start_web, start_worker, stream_text


def chat(model: str, max_tokens: int, stream: bool = True) -> dict[str, object]:
    body = {"model": model, "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    return {**body, "stream_options": {"include_usage": True}} if stream else body


def ended_whole(datas: list[str], tokens: int) -> None:
    """The stream ran to its end: no error, `length`, every token counted, then [DONE]."""
    assert datas[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in datas[:-1]]
    assert not [c for c in chunks if "error" in c]
    assert [c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]] \
        == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == tokens


def registered(rds: redis.Redis, pid: int) -> bool:
    return any(b and orjson.loads(b)["pid"] == pid
               for b in (rds.get(k) for k in rds.scan_iter(keys.worker("*"))))


def test_worker_finishes_jobs_in_flight_then_exits(
    base_url: str, env: dict[str, str], rds: redis.Redis, tmp_path: Path
) -> None:
    worker = start_worker(env, str(own_model(tmp_path, "drained")),
                          tmp_path / "worker.log")
    try:
        results: dict[int, list[str]] = {}
        started = threading.Barrier(4)

        def one(i: int) -> None:
            with httpx.stream("POST", f"{base_url}/v1/chat/completions",
                              json=chat("drained", 24), timeout=60) as r:
                assert r.status_code == 200, r.read()
                events = sse_events(r.iter_lines())
                datas = [next(events)[1]]
                started.wait()
                datas += [d for _, d in events]
                results[i] = datas

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        started.wait(timeout=60)  # every stream has its first token: all three are in flight
        worker.p.terminate()
        for t in threads:
            t.join(timeout=60)

        assert worker.p.wait(timeout=30) == 0
        assert sorted(results) == [0, 1, 2]
        for datas in results.values():
            ended_whole(datas, 24)
        assert not registered(rds, worker.p.pid)
        assert not rds.zcard(keys.queue("drained"))  # nothing left behind in the queue
        assert "draining: 3 jobs in flight" in worker.log.read_text()

        # Nothing serves the model now: a new request is refused, never run on the old worker.
        r = httpx.post(f"{base_url}/v1/chat/completions", json=chat("drained", 4, stream=False),
                       timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
    finally:
        worker.stop()


def test_worker_ends_jobs_past_the_drain_deadline(
    base_url: str, env: dict[str, str], rds: redis.Redis, tmp_path: Path
) -> None:
    worker = start_worker({**env, "FERRY_DRAIN_S": "0.5"}, str(own_model(tmp_path, "deadline")),
                          tmp_path / "worker.log")
    try:
        lost: dict[str, httpx.Response] = {}

        def blocking() -> None:  # a non-streaming client in flight, too
            lost["r"] = httpx.post(f"{base_url}/v1/chat/completions",
                                   json=chat("deadline", 1500, stream=False), timeout=60)

        plain = threading.Thread(target=blocking)
        with httpx.stream("POST", f"{base_url}/v1/chat/completions",
                          json=chat("deadline", 1500), timeout=60) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
            first = next(events)[1]
            plain.start()
            # Both jobs taken by the worker (a job still queued when the drain starts is never
            # taken: its client gets no_worker, rightly), then the drain.
            deadline = time.monotonic() + 30

            def both_taken() -> bool:
                jobs = [j.decode() for j in rds.zrange(keys.queue("deadline"), 0, -1)]
                return len(jobs) == 2 and all(rds.exists(keys.job_worker(j)) for j in jobs)

            while not both_taken():
                assert time.monotonic() < deadline, "the worker did not take both jobs in 30 s"
                time.sleep(0.01)
            worker.p.terminate()
            stopped_at = time.monotonic()
            rest = [d for _, d in events]
        plain.join(timeout=30)

        assert time.monotonic() - stopped_at < 10  # the deadline, not 1,500 tokens
        assert rest[-1] == "[DONE]"
        assert orjson.loads(rest[-2])["error"]["code"] == "worker_stopping"
        assert 0 < len(stream_text([first, *rest[:-2]]))
        assert lost["r"].status_code == 503, lost["r"].text
        assert lost["r"].json()["error"]["code"] == "worker_stopping"
        assert lost["r"].headers.get("Retry-After")
        assert worker.p.wait(timeout=30) == 0
        assert not registered(rds, worker.p.pid)
        assert not rds.zcard(keys.queue("deadline"))  # ended, not put back to run again
    finally:
        worker.stop()


@pytest.mark.usefixtures("worker")
def test_web_lets_open_streams_finish_then_exits(env: dict[str, str], tmp_path: Path) -> None:
    web, url = start_web(env, tmp_path / "web.log")
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat(SMOLLM, 16),
                          timeout=60) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
            datas = [next(events)[1]]
            web.p.terminate()
            refused = False
            deadline = time.monotonic() + 5
            while not refused and time.monotonic() < deadline:  # no new connection is taken
                try:
                    httpx.get(f"{url}/health", timeout=1)
                    time.sleep(0.02)
                except httpx.TransportError:
                    refused = True
            datas += [d for _, d in events]
        assert refused
        ended_whole(datas, 16)
        assert web.p.wait(timeout=30) == 0
    finally:
        web.stop()
