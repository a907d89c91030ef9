"""A batch uses the whole engine when it is alone, and an interactive job that comes starts at
once: the engine pauses a batch line for it, and the line goes on afterwards.

The worker here serves SmolLM2 under its own id with 6 sequences, 4 of them for interactive jobs,
and writes every decode step (`FERRY_STREAM_INTERVAL_MS=0`), so when each line generated can be
read from its stream's entry ids (Redis' clock, in ms).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from shared import keys
from tests.helpers import Proc, own_model, sse_events, start_worker
from tests.integration.test_batches import jsonl

PARALLEL = 4  # the sequences at work while an interactive job is in
SEQUENCES = 6  # those a batch alone fills
CTX = 2048  # the KV cache, shared by them


@pytest.fixture(scope="module")
def model(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("priority")
    worker: Proc = start_worker({**env, "FERRY_PARALLEL": str(PARALLEL),
                                 "FERRY_BATCH_PARALLEL": str(SEQUENCES),
                                 "FERRY_CTX_LEN": str(CTX), "FERRY_STREAM_INTERVAL_MS": "0"},
                                str(own_model(tmp, "prioritised")), tmp / "worker.log")
    yield "prioritised"
    worker.stop()


@pytest.fixture(scope="module")
def worker_log(model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return next(tmp_path_factory.getbasetemp().glob("priority*/worker.log"))


def lines(model: str, count: int, tokens: int, spread: int = 0) -> list[dict[str, Any]]:
    """`count` lines of `tokens` tokens each, the i-th `spread` × i more (so they end apart)."""
    return [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": tokens + spread * i, "ignore_eos": True,
                      "temperature": 0,
                      "messages": [{"role": "user", "content": f"Line {i}: tell a story."}]}}
            for i in range(count)]


def start(base_url: str, body: list[dict[str, Any]]) -> str:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    upload = client.files.create(file=("in.jsonl", jsonl(body)), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id


def finish(http: httpx.Client, batch_id: str, timeout_s: float = 150) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (batch := http.get(f"/v1/batches/{batch_id}").json())["status"] != "completed":
        assert time.monotonic() < deadline and batch["status"] in ("validating", "in_progress",
                                                                    "finalizing"), batch
        time.sleep(0.2)
    return batch


def spans(rds: redis.Redis, batch_id: str, count: int) -> list[tuple[int, int]]:
    """(first token, last entry) ms of each line's job, from its stream."""
    out = []
    for line in range(count):
        entries = rds.xrange(keys.stream(f"{batch_id}-{line}-0"))
        assert entries, line
        out.append((int(entries[0][0].split(b"-")[0]), int(entries[-1][0].split(b"-")[0])))
    return out


def most_at_once(spans_ms: list[tuple[int, int]]) -> int:
    edges = sorted([(a, 1) for a, _ in spans_ms] + [(b, -1) for _, b in spans_ms])
    busy = top = 0
    for _, step in edges:
        busy += step
        top = max(top, busy)
    return top


def test_a_batch_alone_fills_every_sequence(base_url: str, model: str, http: httpx.Client,
                                            rds: redis.Redis) -> None:
    batch_id = start(base_url, lines(model, 18, 24))
    batch = finish(http, batch_id)
    assert batch["request_counts"]["completed"] == 18
    assert most_at_once(spans(rds, batch_id, 18)) == SEQUENCES


def test_lines_beyond_parallel_start_only_where_the_kv_cache_holds_them_whole(
        base_url: str, model: str, http: httpx.Client, rds: redis.Redis) -> None:
    """Each line may come to hold its prompt and `max_tokens`: five such lines fit in the KV
    cache, six would not, so a sixth never starts beside five (it would be ended short, with
    `length`, when the cache filled)."""
    body = lines(model, 10, 1)
    prompt = http.post("/v1/chat/completions", json=body[0]["body"]).json()["usage"]["prompt_tokens"]
    most = CTX // 5 - 30  # prompt + max_tokens: five fit, six do not
    assert 5 * (most + 2) <= CTX < 6 * most
    for line in body:
        line["body"]["max_tokens"] = most - prompt
    batch_id = start(base_url, body)
    batch = finish(http, batch_id)
    assert batch["request_counts"]["completed"] == 10
    assert most_at_once(spans(rds, batch_id, 10)) == 5


def test_an_interactive_request_pauses_a_line_and_starts_at_once(
        base_url: str, model: str, http: httpx.Client, rds: redis.Redis, worker_log: Path) -> None:
    count, long = 8, 160
    body = lines(model, count, 24)
    for line in body[:SEQUENCES]:  # these hold every sequence well past the interactive request
        line["body"]["max_tokens"] = long
    batch_id = start(base_url, body)
    deadline = time.monotonic() + 60
    while len([k for k in rds.scan_iter(keys.stream(f"{batch_id}-*"))]) < SEQUENCES:
        assert time.monotonic() < deadline, "the batch never filled the worker"
        time.sleep(0.05)
    time.sleep(0.3)  # every line past its prompt
    seconds, micros = rds.time()
    sent_ms = int(seconds * 1000 + micros // 1000)
    chat = {"model": model, "max_tokens": 4, "stream": True,
            "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=chat, timeout=60) as r:
        events = list(sse_events(r.iter_lines()))
    job = orjson.loads(events[0][1])["id"].removeprefix("chatcmpl-")
    own = [int(i.split(b"-")[0]) for i, _ in rds.xrange(keys.stream(job))]
    first_ms, last_ms = own[0], own[-1]
    batch = finish(http, batch_id)
    lines_ms = spans(rds, batch_id, count)
    running = [end for begin, end in lines_ms if begin < sent_ms < end]
    # Every sequence was busy with a line, and the request did not wait for one to end.
    assert len(running) == SEQUENCES and first_ms < min(running), (sent_ms, first_ms, lines_ms)
    assert "paused for an interactive job" in worker_log.read_text()
    # While it ran, lines held the sequences left of `PARALLEL`: the others were paused.
    beside = [line for line in range(count)
              if any(first_ms < int(i.split(b"-")[0]) < last_ms
                     for i, _ in rds.xrange(keys.stream(f"{batch_id}-{line}-0")))]
    assert 0 < len(beside) <= PARALLEL - 1, (first_ms, last_ms, beside)
    # The paused line went on to its full length, its prompt counted once.
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    out = [orjson.loads(line) for line in
           client.files.content(batch["output_file_id"]).text.splitlines()]
    answers = {o["custom_id"]: o["response"]["body"] for o in out}
    assert len(answers) == count
    for i in range(count):
        usage = answers[f"l{i}"]["usage"]
        assert usage["completion_tokens"] == (long if i < SEQUENCES else 24), (i, usage)
        assert usage["prompt_tokens"] == answers["l0"]["usage"]["prompt_tokens"], (i, usage)


def test_a_paused_line_gives_the_answer_it_gives_unpaused(
        base_url: str, env: dict[str, str], http: httpx.Client, rds: redis.Redis,
        tmp_path: Path) -> None:
    """One sequence, greedy: the line is paused mid-answer for an interactive request (its cells
    go to host memory and come back), and its answer equals the same request's, run alone."""
    worker = start_worker({**env, "FERRY_PARALLEL": "1", "FERRY_BATCH_PARALLEL": "1",
                           "FERRY_STREAM_INTERVAL_MS": "0"},
                          str(own_model(tmp_path, "single")), tmp_path / "worker.log")
    try:
        line = lines("single", 1, 120)[0]
        line["body"]["messages"][0]["content"] = "Tell me a long story about a lighthouse keeper."
        batch_id = start(base_url, [line])
        deadline = time.monotonic() + 60
        while len(rds.xrange(keys.stream(f"{batch_id}-0-0"))) < 20:  # well into its answer
            assert time.monotonic() < deadline, "the line never started"
            time.sleep(0.02)
        chat = {"model": "single", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
        batch = finish(http, batch_id)
        assert "paused for an interactive job" in (tmp_path / "worker.log").read_text()
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
        paused = orjson.loads(client.files.content(batch["output_file_id"]).text)["response"]["body"]
        alone = http.post("/v1/chat/completions", json=line["body"]).json()
        assert paused["usage"]["completion_tokens"] == alone["usage"]["completion_tokens"] == 120
        assert paused["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"]
        assert paused["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
    finally:
        worker.stop()
