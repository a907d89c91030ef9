"""Continuous batching: many jobs share one model at once, and none of them can tell.

The worker here serves SmolLM2 under its own id with a small batch (`FERRY_N_BATCH=32`), so a long
prompt takes many decode steps, and writes every step (`FERRY_STREAM_INTERVAL_MS=0`), so its
chunking can be seen from outside.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis

from shared import keys
from tests.helpers import smollm_path, sse_events, start_web, start_worker

MODEL = "batched"
N_BATCH = 32


@pytest.fixture(scope="module")
def url(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("batched")
    link = tmp / f"{MODEL}.gguf"
    link.symlink_to(smollm_path())
    worker = start_worker({**env, "FERRY_N_BATCH": str(N_BATCH), "FERRY_PARALLEL": "8",
                           "FERRY_STREAM_INTERVAL_MS": "0"}, str(link), tmp / "worker.log")
    web, base = start_web({**env, "FERRY_QUEUE_LIMIT": "8"}, tmp / "web.log")
    yield base
    web.stop()
    worker.stop()


def chat(content: str, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 16, **kw}


def together(fn: Any, args: list[Any]) -> list[Any]:
    """Run `fn` on every argument at once, in threads; results in order."""
    out: list[Any] = [None] * len(args)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            out[i] = fn(args[i])
        except BaseException as e:  # noqa: BLE001  # surfaced below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


class Stream:
    """A streamed chat completion read in a thread: its text and when each piece arrived."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self.url, self.body = url, {**body, "stream": True}
        self.arrivals: list[float] = []
        self.text = ""
        self.finish: str | None = None
        self.started = threading.Event()
        self.stop = threading.Event()  # set to drop the connection
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=self.body,
                          timeout=120) as r:
            assert r.status_code == 200, r.read()
            for _, data in sse_events(r.iter_lines()):
                if data == "[DONE]":
                    break
                choice = orjson.loads(data)["choices"][0]
                if piece := choice["delta"].get("content"):
                    self.arrivals.append(time.monotonic())
                    self.text += piece
                    self.started.set()
                self.finish = choice["finish_reason"] or self.finish
                if self.stop.is_set():
                    return

    def join(self) -> Stream:
        self.thread.join(timeout=120)
        return self


def test_concurrent_answers_equal_the_same_requests_alone(url: str) -> None:
    """Greedy answers in a crowd are the answers alone, token by token, to rounding.

    llama.cpp's kernels are not batch-invariant: a prompt decoded beside others attends over a KV
    cache laid out differently (sums in another order), so logits differ in the last bits, and
    a 135M model sometimes has two tokens within that of each other. So: every token is the same
    with the same logprob (to 0.2; measured differences reach 0.05), until (if ever) a token where
    the two best were close. Cross-talk between sequences would change the whole distribution.
    """
    bodies = [chat(f"Name a fruit that starts with the letter {c}.", logprobs=True,
                   top_logprobs=2) for c in "ABCDEFGH"]
    with httpx.Client(base_url=url, timeout=120) as http:
        alone = [http.post("/v1/chat/completions", json=b).json() for b in bodies]
        crowd = together(lambda b: http.post("/v1/chat/completions", json=b).json(), bodies)
    same = 0
    for a, c in zip(alone, crowd, strict=True):
        a_tokens = a["choices"][0]["logprobs"]["content"]
        c_tokens = c["choices"][0]["logprobs"]["content"]
        for x, y in zip(a_tokens, c_tokens, strict=False):
            if x["token"] != y["token"]:
                first, second = x["top_logprobs"]
                assert first["logprob"] - second["logprob"] < 0.4, (x, y)
                assert y["token"] in (first["token"], second["token"])
                break
            assert abs(x["logprob"] - y["logprob"]) < 0.2, (x, y)
        else:
            same += 1
            assert c["choices"][0]["message"] == a["choices"][0]["message"]
            assert c["usage"]["completion_tokens"] == a["usage"]["completion_tokens"]
    assert same >= 4  # near-ties are rare: most answers are identical outright

def test_a_long_prompt_is_chunked_between_the_streams_steps(url: str) -> None:
    streams = [Stream(url, chat(f"Count from {i}.", max_tokens=16, ignore_eos=True))
               for i in range(4)]
    for s in streams:
        assert s.started.wait(60)
    prompt = " ".join(f"word{i}" for i in range(300))  # ~ 900 tokens: ~30 chunks of 32
    sent = time.monotonic()
    with httpx.Client(base_url=url, timeout=120) as http:
        long = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt,
                                                  "max_tokens": 1})
    done = time.monotonic()
    assert long.status_code == 200
    assert long.json()["usage"]["prompt_tokens"] > 20 * N_BATCH
    for s in streams:
        s.join()
        assert s.finish == "length" and len(s.arrivals) >= 15
        during = [t for t in s.arrivals if sent < t < done]
        left = [t for t in s.arrivals if t > sent]
        # Processed whole, the prompt would hold every stream for all its chunks at once; chunked,
        # each stream gets a token every step while it is decoded.
        assert len(during) >= min(len(left), 8), (len(during), len(left))


def test_cancel_one_stream_and_the_others_finish(url: str) -> None:
    streams = [Stream(url, chat(f"Tell story {i}.", max_tokens=16, ignore_eos=True))
               for i in range(4)]
    for s in streams:
        assert s.started.wait(60)
    streams[0].stop.set()
    for s in streams:
        s.join()
    assert streams[0].finish is None
    for s in streams[1:]:
        assert s.finish == "length" and s.text


def test_n_choices_share_one_prompt(url: str) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        one = http.post("/v1/chat/completions", json=chat("Say hello.")).json()
        three = http.post("/v1/chat/completions",
                          json=chat("Say hello.", n=3, logprobs=True, top_logprobs=2)).json()
        sampled = http.post("/v1/chat/completions",
                            json=chat("Say hello.", n=3, temperature=1.0, seed=7)).json()
    # The prompt is decoded (and counted) once; every choice's first token comes from its one
    # row of logits, so the greedy choices start identically, to the last bit.
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    firsts = [c["logprobs"]["content"][0] for c in three["choices"]]
    assert all(f == firsts[0] for f in firsts)
    assert all(c["finish_reason"] == "length" or c["message"]["content"] for c in three["choices"])
    # A seed gives each choice its own draw.
    assert len({c["message"]["content"] for c in sampled["choices"]}) > 1

def test_json_schema_next_to_free_text(url: str) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}},
              "required": ["name"]}
    structured = chat("Give a name as JSON.", max_tokens=32, response_format={
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    free = chat("Say hello.")
    with httpx.Client(base_url=url, timeout=120) as http:
        answers = together(lambda b: http.post("/v1/chat/completions", json=b).json(),
                           [structured, free, structured, free])
    for a in answers[0::2]:
        assert isinstance(orjson.loads(a["choices"][0]["message"]["content"])["name"], str)
    for a in answers[1::2]:  # the grammar stayed on its own sequences
        text = a["choices"][0]["message"]["content"]
        assert text and not text.lstrip().startswith("{")

def test_repeated_prompt_and_next_turn_reuse_the_cache(url: str) -> None:
    first = chat("Remember the word lighthouse, then say ok.", max_tokens=8)
    with httpx.Client(base_url=url, timeout=120) as http:
        a = http.post("/v1/chat/completions", json=first).json()
        again = http.post("/v1/chat/completions", json=first).json()
        # Other users in between take the least recently used sequences, not this chat's.
        together(lambda b: http.post("/v1/chat/completions", json=b).json(),
                 [chat(f"Say {i}.", max_tokens=2) for i in range(7)])
        turn = {**first, "messages": [*first["messages"], a["choices"][0]["message"],
                                      {"role": "user", "content": "Which word?"}]}
        b = http.post("/v1/chat/completions", json=turn).json()
    prompt = a["usage"]["prompt_tokens"]
    assert again["usage"]["prompt_tokens"] == prompt
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt - 1
    assert again["choices"][0]["message"] == a["choices"][0]["message"]
    # The history is not decoded again: at least the first turn's prompt is reused.
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] >= prompt - 1


def test_logprobs_next_to_no_logprobs(url: str) -> None:
    with_lp = chat("Say yes.", max_tokens=4, logprobs=True, top_logprobs=3)
    without = chat("Say no.", max_tokens=4)
    with httpx.Client(base_url=url, timeout=120) as http:
        answers = together(lambda b: http.post("/v1/chat/completions", json=b).json(),
                           [with_lp, without, with_lp, without])
    for a in answers[0::2]:
        content = a["choices"][0]["logprobs"]["content"]
        assert "".join(t["token"] for t in content) == a["choices"][0]["message"]["content"]
        for t in content:
            assert t["logprob"] <= 0 and len(t["top_logprobs"]) == 3
            assert t["top_logprobs"][0]["logprob"] >= t["logprob"] - 1e-4  # greedy picks the top
    for a in answers[1::2]:
        assert a["choices"][0]["logprobs"] is None


def test_queue_limit_is_exact_under_a_burst(url: str, rds: redis.Redis) -> None:
    """Limit 8 (the worker's 8 sequences hold 8 jobs in the queue while they run): of 24 long
    streams sent at once, exactly 8 are admitted, however they race."""
    deadline = time.monotonic() + 30
    while rds.zcard(keys.queue(MODEL)):  # earlier tests' jobs have left
        assert time.monotonic() < deadline
        time.sleep(0.05)
    opened = threading.Barrier(24)

    def one(_: int) -> int:
        body = {**chat("Go on.", max_tokens=200, ignore_eos=True), "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            opened.wait(timeout=60)  # all answered before any admitted stream is dropped
            return r.status_code

    codes = together(one, list(range(24)))
    assert sorted(codes).count(200) == 8 and codes.count(429) == 16, codes
    # The dropped streams stop once the resume grace (1 s here) has passed: the queue empties.
    deadline = time.monotonic() + 30
    while rds.zcard(keys.queue(MODEL)):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_parallel_is_a_listed_setting() -> None:
    out = subprocess.run([sys.executable, "-m", "ferry", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "FERRY_PARALLEL" in out


def test_logit_bias_steers_and_an_unknown_token_is_400(url: str) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        yes = http.post("/extras/tokenize", json={"model": MODEL, "input": " yes",
                                                  "add_special": False}).json()["tokens"]
        body = {"model": MODEL, "prompt": "Say", "max_tokens": 3, "temperature": 0}
        r = http.post("/v1/completions", json={**body, "logit_bias": {str(yes[0]): 100}})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == " yes" * 3
        bad = http.post("/v1/completions", json={**body, "logit_bias": {"99999999": 5}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"
