"""With two workers on a model, a chat's next turn goes where its history is cached.

Two real workers serve SmolLM2 under the id ``routed`` with 2 sequences each (so 2 jobs make one
busy), behind the session's web process; which worker ran a job is its owner key in Redis, and
the route the handler chose is in the job's metadata.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis

from shared import keys
from tests.helpers import Proc, own_model, start_web, start_worker

MODEL = "routed"
SYSTEM = ("You are a terse assistant for a shipping company. Answer in one short sentence. "
          "Never use lists. Mention the harbour when it helps. ") * 4


@pytest.fixture(scope="module")
def workers(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    tmp = tmp_path_factory.mktemp("routing")
    path = str(own_model(tmp, MODEL))
    procs = [start_worker({**env, "FERRY_PARALLEL": "2"}, path, tmp / f"worker{i}.log")
             for i in range(2)]
    yield procs
    for p in procs:
        p.stop()


def worker_ids(rds: redis.Redis, procs: list[Proc]) -> dict[int, str]:
    """pid -> worker id, from the heartbeats."""
    beats = [orjson.loads(b) for k in rds.scan_iter(keys.worker("*")) if (b := rds.get(k))]
    pids = {p.p.pid for p in procs}
    return {b["pid"]: b["id"] for b in beats if b["pid"] in pids}


def turn(http: httpx.Client, messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                "max_tokens": 12, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def ran_on(rds: redis.Redis, answer: dict[str, Any]) -> str:
    job = answer["id"].removeprefix("chatcmpl-")
    return rds.get(keys.job_worker(job)).decode()


def route_of(rds: redis.Redis, answer: dict[str, Any]) -> dict[str, Any] | None:
    job = answer["id"].removeprefix("chatcmpl-")
    return orjson.loads(rds.get(keys.job_meta(job)))["route"]


def conversation(topic: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Tell me about {topic}."}]


def follow_up(history: list[dict[str, str]], answer: dict[str, Any], ask: str) -> list[dict[str, str]]:
    return [*history, {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
            {"role": "user", "content": ask}]


def test_later_turns_go_to_the_worker_that_holds_the_conversation(
        workers: list[Proc], http: httpx.Client, rds: redis.Redis) -> None:
    served: set[str] = set()
    for topic in ("cranes", "tides", "containers", "tugboats"):
        history = conversation(topic)
        first = turn(http, history)
        home = ran_on(rds, first)
        served.add(home)
        for ask in ("Why?", "And then?"):
            history = follow_up(history, first, ask)
            later = turn(http, history)
            route = route_of(rds, later)
            assert route is not None and route["decision"] == "hit", route
            assert route["worker"] == home and ran_on(rds, later) == home
            assert route["blocks"] == len(history) - 2  # all but the reply and the new question
            # its worker decoded none of the earlier prompt again
            assert later["usage"]["prompt_tokens_details"]["cached_tokens"] >= \
                first["usage"]["prompt_tokens"]
            first = later
    metrics = http.get("/metrics").text
    assert f'ferry_route_decisions_total{{model="{MODEL}",decision="hit"}}' in metrics
    cached = [line for line in metrics.splitlines()
              if line.startswith(f'ferry_route_cached_tokens_total{{model="{MODEL}",decision="hit"}}')]
    assert cached and int(cached[0].split()[-1]) > 0


def test_a_session_key_goes_where_its_session_is(
        workers: list[Proc], http: httpx.Client, rds: redis.Redis) -> None:
    """Two unrelated prompts with one prompt_cache_key land on one worker."""
    first = turn(http, conversation("ropes"), prompt_cache_key="user-42")
    second = turn(http, [{"role": "user", "content": "Something else entirely."}],
                  prompt_cache_key="user-42")
    assert route_of(rds, second)["decision"] == "hit"
    assert ran_on(rds, second) == ran_on(rds, first)


def test_anthropic_sessions_and_responses_chains_go_where_they_are_cached(
        workers: list[Proc], http: httpx.Client, rds: redis.Redis) -> None:
    """Anthropic's `metadata.user_id` names a session (Claude Code sends one); a Responses chain
    (`previous_response_id`) resends its history, found by the cache map."""
    def message(content: str) -> str:
        r = http.post("/v1/messages", json={
            "model": MODEL, "max_tokens": 8, "metadata": {"user_id": "claude-session-7"},
            "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 200, r.text
        return str(r.json()["id"]).removeprefix("msg_")

    first, second = message("Tell me about knots."), message("Something unrelated.")
    assert orjson.loads(rds.get(keys.job_meta(second)))["route"]["decision"] == "hit"
    assert rds.get(keys.job_worker(second)) == rds.get(keys.job_worker(first))

    def respond(**body: Any) -> str:
        r = http.post("/v1/responses", json={"model": MODEL, "max_output_tokens": 8,
                                             "temperature": 0, **body})
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    start = respond(instructions=SYSTEM, input="Tell me about buoys.")
    chained = respond(instructions=SYSTEM, input="Why?", previous_response_id=start)
    job, home = chained.removeprefix("resp_"), start.removeprefix("resp_")
    route = orjson.loads(rds.get(keys.job_meta(job)))["route"]
    assert route["decision"] == "hit", route
    assert rds.get(keys.job_worker(job)) == rds.get(keys.job_worker(home))


def hog(base_url: str, history: list[dict[str, str]], stop: threading.Event) -> threading.Thread:
    """A long streamed turn of the conversation `history` (two of them fit the 2,048-token
    context), held open until `stop`."""
    def run() -> None:
        body = {"model": MODEL, "messages": [*history, {"role": "user", "content": "Go on."}],
                "max_tokens": 700, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=base_url, timeout=120) as client, \
                client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            for _ in r.iter_lines():
                if stop.is_set():
                    return
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_load(rds: redis.Redis, worker: str, jobs: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while int(rds.hget(keys.model_load(MODEL), worker) or 0) < jobs:
        assert time.monotonic() < deadline, rds.hgetall(keys.model_load(MODEL))
        time.sleep(0.05)


@pytest.fixture
def held(workers: list[Proc], http: httpx.Client, rds: redis.Redis, base_url: str,
         request: pytest.FixtureRequest) -> Iterator[tuple[list[dict[str, str]], dict[str, Any], str]]:
    """A conversation of the test's own whose worker is kept busy (both its sequences) by two
    more of its turns."""
    history = conversation(f"anchors, for {request.node.name}")
    first = turn(http, history)
    home = ran_on(rds, first)
    history = follow_up(history, first, "More.")
    stop = threading.Event()
    threads = [hog(base_url, history, stop) for _ in range(2)]
    try:
        wait_load(rds, home, 2)
        yield history, first, home
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)


def test_a_busy_workers_turn_goes_to_the_other(
        held: tuple[list[dict[str, str]], dict[str, Any], str], http: httpx.Client,
        rds: redis.Redis) -> None:
    history, _, home = held
    later = turn(http, history)
    route = route_of(rds, later)
    assert route["decision"] == "busy" and route["worker"] != home, route
    assert ran_on(rds, later) == route["worker"]


def test_an_idle_worker_takes_a_job_left_waiting_for_a_busy_one(
        held: tuple[list[dict[str, str]], dict[str, Any], str], env: dict[str, str],
        rds: redis.Redis, tmp_path: Any) -> None:
    """A web process that never counts a worker busy routes the turn to its full worker: the
    other takes it once the route's wait is over, while both sequences there are still held."""
    history, _, home = held
    web, url = start_web({**env, "FERRY_ROUTE_MAX_LOAD": "100", "FERRY_ROUTE_WAIT_MS": "300"},
                         tmp_path / "web.log")
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            later = turn(client, history)
            still_held = int(rds.hget(keys.model_load(MODEL), home) or 0)
        route = route_of(rds, later)
        assert route["decision"] == "hit" and route["worker"] == home
        assert ran_on(rds, later) != home
        assert still_held == 2  # it did not wait for a hog to end (no timing: CI is slow)
    finally:
        web.stop()


def test_new_conversations_arriving_together_share_the_workers(
        workers: list[Proc], http: httpx.Client, rds: redis.Redis) -> None:
    """Four first turns sent at once, three times: each worker is routed two of each four (the
    web process decides one route at a time, so each decision counts the last; at once, all four
    read the same loads and could all go to one worker, their later turns after them)."""
    async def burst(system: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=60) as client:
            async def first_turn(topic: str) -> dict[str, Any]:
                r = await client.post("/v1/chat/completions", json={
                    "model": MODEL, "max_tokens": 24, "ignore_eos": True, "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": f"Name {topic}."}]})
                assert r.status_code == 200, r.text
                return dict(r.json())
            return await asyncio.gather(*(first_turn(t) for t in ("a fish", "a knot", "a ship",
                                                                   "a port")))

    for n in range(3):
        deadline = time.monotonic() + 30  # the jobs before (another test's) are over
        while any(int(v) for v in rds.hvals(keys.model_load(MODEL))):
            assert time.monotonic() < deadline, rds.hgetall(keys.model_load(MODEL))
            time.sleep(0.05)
        system = f"You answer in one word. Burst {n} of {time.time_ns()}. " * 4  # cached nowhere
        routes = [route_of(rds, a) for a in asyncio.run(burst(system))]
        assert all(r is not None and r["decision"] == "miss" for r in routes), routes
        assert sorted(Counter(r["worker"] for r in routes).values()) == [2, 2], routes


def test_a_dead_workers_cache_map_goes_with_it(
        workers: list[Proc], http: httpx.Client, rds: redis.Redis) -> None:
    """Last in this module: it kills one of the two workers."""
    history = conversation("lighthouses")
    first = turn(http, history)
    home = ran_on(rds, first)
    assert rds.exists(keys.cache_map(MODEL, home))
    victim = next(p for p in workers if worker_ids(rds, [p]).get(p.p.pid) == home)
    victim.kill()
    deadline = time.monotonic() + 10
    while rds.exists(keys.cache_map(MODEL, home)):
        assert time.monotonic() < deadline, "the dead worker's map outlived its heartbeat"
        time.sleep(0.1)
    later = turn(http, follow_up(history, first, "Why?"))
    assert ran_on(rds, later) != home
