"""The queue path's guarantees: concurrency, cancel on disconnect, dead workers, resume, limits."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import orjson
import redis

from functions.queue.handle import TAKE_GRACE_S, JobState, job_state, taken_s_ago
from functions.queue.reader import read_all
from functions.queue.submit import JobMeta, submit
from shared import keys
from shared.errors import QueueFull
from shared.jobs import Error, Final, GenerationJob, Sampling
from shared.redis import connect
from shared.settings import Settings
from tests.helpers import SMOLLM, Proc, sse_events, start_worker

LONG = {"model": SMOLLM, "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 400, "ignore_eos": True, "stream": True}






def job_id_of(chunk_data: str) -> str:
    return orjson.loads(chunk_data)["id"].removeprefix("chatcmpl-")


def deltas_in(rds: redis.Redis, job_id: str) -> int:
    return sum(1 for _, f in rds.xrange(keys.stream(job_id))
               if orjson.loads(f[b"m"])["kind"] == "delta")


def test_concurrent_streams_all_complete(base_url: str) -> None:
    results: dict[int, list[str]] = {}

    def one(i: int) -> None:
        body = {"model": SMOLLM, "prompt": f"{i} + {i} =", "max_tokens": 5, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            results[i] = [d for _, d in sse_events(r.iter_lines())]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(6))
    for datas in results.values():
        assert datas[-1] == "[DONE]"
        ids = {orjson.loads(d)["id"] for d in datas[:-1]}
        assert len(ids) == 1  # every chunk of a stream belongs to its own job
    assert len({orjson.loads(d[0])["id"] for d in results.values()}) == 6


def test_disconnect_stops_generation_and_frees_the_model(
    base_url: str, http: httpx.Client, rds: redis.Redis
) -> None:
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=LONG, timeout=60) as r:
        assert r.status_code == 200
        first = next(d for _, d in sse_events(r.iter_lines()))
    job = job_id_of(first)  # the client is gone now
    deadline = time.monotonic() + 10
    while not (value := rds.get(keys.job_cancel(job))):
        assert time.monotonic() < deadline, "the handler never told the worker to stop"
        time.sleep(0.005)
    # It waits out the grace period (FERRY_RESUME_GRACE_S=1 here) for the client to come back. The
    # deadline is written to the millisecond, so it may round up by half of one.
    assert value.startswith(b"at:") and float(value[3:]) - time.time() <= 1.001
    cancel_at = float(value[3:])
    time.sleep(max(0.0, cancel_at - time.time()))
    while True:
        kinds = [orjson.loads(f[b"m"])["kind"] for _, f in rds.xrange(keys.stream(job))]
        if kinds and kinds[-1] == "error":
            break
        assert time.monotonic() < deadline, "the worker did not stop"
        time.sleep(0.05)
    last = orjson.loads(rds.xrevrange(keys.stream(job), count=1)[0][1][b"m"])
    assert last["code"] == "cancelled"
    # The worker reads the flag when it next writes (at most FERRY_STREAM_INTERVAL_MS later) and stops at
    # its next step. A stream entry's id is Redis' clock in ms when it was written.
    written = [int(i.split(b"-")[0]) / 1000 for i, f in rds.xrange(keys.stream(job))
               if orjson.loads(f[b"m"])["kind"] == "delta"]
    assert max(written) - cancel_at <= Settings().stream_interval_ms / 1000 + 0.2
    assert deltas_in(rds, job) < 400
    # The model is free: the next request is served at once.
    r2 = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r2.status_code == 200


def test_resume_with_last_event_id(base_url: str, http: httpx.Client) -> None:
    body = {"model": SMOLLM, "messages": [{"role": "user", "content": "Count to five."}],
            "max_tokens": 24, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        events = list(sse_events(r.iter_lines()))
    assert events[-1][1] == "[DONE]"
    job = orjson.loads(events[0][1])["id"]
    # The client "saw" the events up to one in the middle, then dropped. How many tokens each
    # event carries depends on the machine's speed (the publisher coalesces), so pick by ids.
    with_ids = [k for k, (event_id, _) in enumerate(events) if event_id]
    assert len(with_ids) >= 2, events
    cut = with_ids[len(with_ids) // 2] + 1
    resumed = http.get(f"/v1/chat/completions/{job}/stream",
                       headers={"Last-Event-ID": events[cut - 1][0]})
    assert resumed.status_code == 200
    rest = list(sse_events(iter(resumed.text.splitlines())))
    assert rest == events[cut:]
    again = http.get(f"/api/v1/chat/completions/{job}/stream")  # from the start
    assert list(sse_events(iter(again.text.splitlines()))) == events
    assert http.get("/v1/chat/completions/chatcmpl-nope/stream").status_code == 404


def test_resume_follows_a_live_stream(base_url: str) -> None:
    body = {**LONG, "max_tokens": 12}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        it = sse_events(r.iter_lines())
        first = next(it)
        job = orjson.loads(first[1])["id"]
        with httpx.stream("GET", f"{base_url}/v1/chat/completions/{job}/stream",
                          timeout=60) as follower:
            followed = list(sse_events(follower.iter_lines()))
        original = [first, *it]
    assert followed == original and followed[-1][1] == "[DONE]"


def test_queue_full_is_429(http: httpx.Client, rds: redis.Redis) -> None:
    queue = keys.queue(SMOLLM)
    far_future = time.time() * 1000 + 3_600_000  # never due, so the worker leaves them alone
    fillers = {f"filler-{i}": far_future for i in range(64)}
    rds.zadd(queue, fillers)
    try:
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 429 and r.headers["Retry-After"]
        assert r.json()["error"]["code"] == "queue_full"
    finally:
        rds.zrem(queue, *fillers)
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_batch_lines_fill_the_queue_never_to_refuse_a_user(
    http: httpx.Client, rds: redis.Redis, redis_url: str
) -> None:
    """A batch's lines may take every place in the queue (several workers' windows, say); an
    interactive request does not count them, while another batch line is refused."""
    queue, lines = keys.queue(SMOLLM), keys.batch_lines(SMOLLM)
    far_future = time.time() * 1000 + 3_600_000  # never due, so the worker leaves them alone
    fillers = {f"line-{i}": far_future for i in range(Settings().queue_limit)}
    rds.zadd(queue, fillers)
    rds.sadd(lines, *fillers)

    async def one_more_line() -> str:
        redis = await connect(redis_url)
        job = GenerationJob(id=f"line-more-{time.time_ns()}", model=SMOLLM, kind="text",
                            prompts=["x"], sampling=Sampling(max_tokens=1), background=True)
        try:
            await submit(redis, job, JobMeta(id=job.id, kind="text", model=SMOLLM,
                                             created=int(time.time())), Settings())
            return "queued"
        except QueueFull:
            return "refused"
        finally:
            await redis.aclose()

    try:
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 200, r.text
        assert asyncio.run(one_more_line()) == "refused"
    finally:
        rds.zrem(queue, *fillers)
        rds.srem(lines, *fillers)


def running_jobs_of(rds: redis.Redis, model: str) -> list[str]:
    """The jobs of `model` a worker has taken (arq's in-progress keys). Other tests' jobs on the
    session's own worker may be in progress too: they are not this model's."""
    ids = [k.decode().removeprefix("arq:in-progress:") for k in rds.scan_iter("arq:in-progress:*")]
    metas = rds.mget([keys.job_meta(i) for i in ids]) if ids else []
    return [i for i, m in zip(ids, metas, strict=True)
            if m is not None and orjson.loads(m)["model"] == model]


def kill_once_running(rds: redis.Redis, worker: Proc, model: str) -> None:
    deadline = time.monotonic() + 10
    while not running_jobs_of(rds, model) and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.kill()


def test_killed_worker_ends_streams_and_the_next_worker_serves(
    base_url: str, env: dict[str, str], victim: tuple[str, Path], tmp_path: Path
) -> None:
    model, path = victim
    body = {**LONG, "model": model}
    worker = start_worker(env, str(path), tmp_path / "w1.log")
    try:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                          timeout=30) as r:
            assert r.status_code == 200
            it = sse_events(r.iter_lines())
            next(it)
            killed_at = time.monotonic()
            worker.kill()
            rest = [d for _, d in it]
        assert time.monotonic() - killed_at < 10
        assert rest[-1] == "[DONE]"
        err = orjson.loads(rest[-2])["error"]
        assert err["code"] == "worker_lost"

        # No live worker now: a bounded wait, then 503 with Retry-After.
        with httpx.Client(base_url=base_url, timeout=30) as http:
            started = time.monotonic()
            r = http.post("/v1/chat/completions", json={**body, "stream": False})
            assert r.status_code == 503 and r.headers["Retry-After"]
            assert r.json()["error"]["code"] == "no_worker"
            assert time.monotonic() - started < 5
            # Counted per model, for an autoscaler to wake a pool scaled to zero.
            assert f'ferry_requests_without_worker_total{{model="{model}"}} ' in \
                http.get("/metrics").text

            worker = start_worker(env, str(path), tmp_path / "w2.log")
            ok = http.post("/v1/chat/completions",
                           json={**body, "stream": False, "max_tokens": 3})
            assert ok.status_code == 200, ok.text

            # A non-streaming client whose worker dies mid-job gets 503 with Retry-After. The
            # kill waits for the job to start, however fast the device generates.
            rds = redis.Redis.from_url(env["REDIS_URL"])
            # The last answer can reach the client just before arq drops that job's in-progress
            # key: wait for it to go, so the kill is for the next job's.
            deadline = time.monotonic() + 10
            while running_jobs_of(rds, model) and time.monotonic() < deadline:
                time.sleep(0.01)
            threading.Thread(target=kill_once_running, args=(rds, worker, model)).start()
            lost = http.post("/v1/chat/completions",
                             json={**body, "stream": False, "max_tokens": 1500})
            assert lost.status_code == 503 and lost.headers["Retry-After"]
            assert lost.json()["error"]["code"] == "worker_lost"

            # An async request has no reader to notice its worker die: reading its status
            # ends it as failed (found by bench/soak.py: it stayed "queued" for good).
            worker = start_worker(env, str(path), tmp_path / "w3.log")
            queued = http.post("/v1/chat/completions", headers={"Prefer": "respond-async"},
                               json={**body, "stream": False, "max_tokens": 1500})
            assert queued.status_code == 202, queued.text
            kill_once_running(rds, worker, model)
            rds.close()
            deadline = time.monotonic() + 30
            while (status := http.get(f"/v1/chat/completions/{queued.json()['id']}").json()
                   )["status"] in ("queued", "in_progress") and time.monotonic() < deadline:
                time.sleep(0.2)
            assert status["status"] == "failed", status
            assert status["error"]["code"] == "worker_lost"
    finally:
        worker.stop()


def test_tokenize_uses_the_model_tokenizer(http: httpx.Client) -> None:
    tokens = http.post("/extras/tokenize", json={"input": "Hello, world!"}).json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    count = http.post("/v1/extras/tokenize/count", json={"input": "Hello, world!"}).json()
    assert count == {"count": len(tokens)}
    text = http.post("/api/v1/extras/detokenize", json={"tokens": tokens}).json()["content"]
    assert text.endswith("Hello, world!")
    usage = http.post("/v1/completions", json={"prompt": "Hello, world!", "max_tokens": 1}
                      ).json()["usage"]
    assert usage["prompt_tokens"] == len(tokens)


def test_health(http: httpx.Client) -> None:
    body = http.get("/health").json()
    assert body["status"] == "ok" and body["workers"][SMOLLM] >= 1
    assert body["persistence"] in ("aof", "rdb", "aof+rdb", "off", "unknown")
    assert ("warning" in body) == (body["persistence"] == "off")



def test_status_shows_models_and_workers(http: httpx.Client) -> None:
    for prefix in ("/v1", "/api/v1"):
        body = http.get(f"{prefix}/status").json()
        assert body["api_gateway"] == "healthy" and body["database"]["status"] == "healthy"
        model = body["inference_model"][SMOLLM]
        assert model["status"] == "healthy" and model["state"] == "running"
        assert model["queue_depth"] >= 0 and model["workers"]
        worker = next(w for w in body["workers"] if w["id"] == model["workers"][0])
        assert [m["id"] for m in worker["models"]] == [SMOLLM]
        assert worker["memory_total"] > worker["memory_free"] > 0
        assert worker["beat_at"] > time.time() - 10


def test_streams_expire_after_the_job(http: httpx.Client, rds: redis.Redis) -> None:
    done = http.post("/v1/chat/completions", json={
        "model": SMOLLM, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    job = done.json()["id"].removeprefix("chatcmpl-")
    assert 0 < rds.ttl(keys.stream(job)) <= 300  # FERRY_STREAM_TTL_S, set at the end
    queued = http.post("/v1/chat/completions", headers={"Prefer": "respond-async"}, json={
        "model": SMOLLM, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    job = queued.json()["id"].removeprefix("chatcmpl-")
    deadline = time.monotonic() + 30
    while http.get(f"/v1/chat/completions/{queued.json()['id']}").json().get("status") in (
            "queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rds.ttl(keys.stream(job)) > 3600  # an async result is kept FERRY_ASYNC_TTL_S


def test_how_long_ago_arq_took_a_job(redis_url: str) -> None:
    """arq marks a job taken before the worker records itself as the owner; a worker killed in
    between leaves a job nobody runs until arq's marker expires (job timeout + 10 s). Readers
    and batch runners call an unowned job lost once it has been taken for TAKE_GRACE_S."""
    settings = Settings(job_timeout_s=600)
    marker_ms = int((settings.job_timeout_s + 10) * 1000)

    async def go() -> list[float | None]:
        redis = await connect(redis_url)
        job = f"orphan-{time.time_ns()}"
        try:
            seen = [await taken_s_ago(redis, job, settings)]  # not taken
            await redis.psetex(keys.arq_in_progress(job), marker_ms, b"1")
            seen.append(await taken_s_ago(redis, job, settings))  # taken just now
            aged_ms = marker_ms - int((TAKE_GRACE_S + 5) * 1000)
            await redis.psetex(keys.arq_in_progress(job), aged_ms, b"1")
            seen.append(await taken_s_ago(redis, job, settings))  # taken 15 s ago
            return seen
        finally:
            await redis.delete(keys.arq_in_progress(job))
            await redis.aclose()

    never, now, aged = asyncio.run(go())
    assert never is None
    assert now is not None and now < TAKE_GRACE_S
    assert aged is not None and TAKE_GRACE_S < aged < TAKE_GRACE_S + 6


def test_where_a_job_is_is_answered_in_one_place(redis_url: str) -> None:
    """`job_state`, which the stream reader, the batch driver and runs all ask: queued, taken a
    moment ago, running on a live worker, or lost (owner dead, taken long ago and never owned,
    or, for a caller that names the model, gone from the queue)."""
    settings = Settings(job_timeout_s=600)
    marker_ms = int((settings.job_timeout_s + 10) * 1000)

    async def go() -> list[JobState]:
        redis = await connect(redis_url)
        job, model, owner = f"where-{time.time_ns()}", f"m-{time.time_ns()}", f"w-{time.time_ns()}"
        try:
            await redis.zadd(keys.queue(model), {job: 1})
            seen = [await job_state(redis, job, settings, model)]  # queued
            await redis.zrem(keys.queue(model), job)
            seen += [await job_state(redis, job, settings),  # not in a queue nobody named
                     await job_state(redis, job, settings, model)]  # dropped from its queue
            await redis.psetex(keys.arq_in_progress(job), marker_ms, b"1")
            seen.append(await job_state(redis, job, settings, model))  # taken just now
            await redis.psetex(keys.arq_in_progress(job), marker_ms - int((TAKE_GRACE_S + 5) * 1000),
                               b"1")
            seen.append(await job_state(redis, job, settings))  # taken long ago, never owned
            await redis.set(keys.job_worker(job), owner)
            seen.append(await job_state(redis, job, settings))  # owned by a dead worker
            await redis.set(keys.worker(owner), b"{}", ex=30)
            seen.append(await job_state(redis, job, settings))  # owned by a live one
            return seen
        finally:
            await redis.delete(keys.arq_in_progress(job), keys.job_worker(job), keys.worker(owner),
                               keys.queue(model))
            await redis.aclose()

    assert asyncio.run(go()) == [JobState.QUEUED, JobState.QUEUED, JobState.LOST, JobState.TAKEN,
                                 JobState.LOST, JobState.LOST, JobState.RUNNING]


def test_a_worker_says_on_the_notify_list_when_a_job_ended(redis_url: str, worker: Proc) -> None:
    """A batch's driver learns which lines ended from one list (`job.notify`), not by looking at
    every line's stream: the worker pushes the job's id there once the stream has its last
    message, whether the job completed or failed."""
    settings = Settings()

    async def go() -> dict[str, list[object]]:
        redis = await connect(redis_url)
        notify, tag = f"test:notify:{time.time_ns()}", time.time_ns()
        jobs = [GenerationJob(id=f"ok-{tag}", model=SMOLLM, kind="text", prompts=["1, 2, 3,"],
                              sampling=Sampling(max_tokens=3), notify=notify, background=True),
                GenerationJob(id=f"bad-{tag}", model=SMOLLM, kind="text", prompts=["1, 2, 3,"],
                              sampling=Sampling(max_tokens=10**6), notify=notify)]
        try:
            for job in jobs:
                await submit(redis, job, JobMeta(id=job.id, kind="text", model=SMOLLM,
                                                 created=int(time.time())), settings)
            said: dict[str, list[object]] = {}  # each job said, and its stream as it was then
            deadline = time.monotonic() + 60
            while len(said) < len(jobs) and time.monotonic() < deadline:
                if (item := await redis.blpop([notify], timeout=1)) is not None:
                    said[item[1].decode()] = list(await read_all(redis, item[1].decode()))
            return said
        finally:
            await redis.delete(notify, *(keys.stream(job.id) for job in jobs))
            await redis.aclose()

    said = asyncio.run(go())
    assert len(said) == 2, said
    ok = next(v for k, v in said.items() if k.startswith("ok-"))
    bad = next(v for k, v in said.items() if k.startswith("bad-"))
    assert isinstance(ok[-1], Final) and ok[-1].usage.completion_tokens == 3
    assert isinstance(bad[-1], Error)
