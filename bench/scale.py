"""Scale-out benchmark: N worker processes on one Redis against one worker, in one run, and what
the queue costs per job.

Starts a private Redis and one web process on loopback, then:

1. the queue's overhead: --overhead-jobs chat completions of one token, one at a time, each timed
   at the client and, from arq's result record, inside the worker (start to finish of the job);
   overhead = client time - job time (HTTP, validation, enqueue, wake-up, pick-up, publishing,
   reading back), and pick-up = job start - enqueue;
2. throughput with 1 worker, then with --workers workers (default: one per core), every worker
   with --threads threads (default 1): --requests streams of --tokens tokens each, --concurrency at
   once; aggregate tokens/s, and the ratio N workers / 1 worker;
3. Redis' own work per job and per token, from INFO commandstats and INFO cpu over steps 1 and
   2: the figures that say how many jobs and tokens one Redis can carry (see infra/README.md).

    python bench/scale.py [--workers 2] [--threads 1] [--requests 48] [--tokens 64]
                          [--concurrency 16] [--overhead-jobs 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stream import Processes, pct, redis_url  # noqa: E402
from ferry.redis_server import free_port  # noqa: E402

MODEL = "smollm2-135m-instruct"


def redis_cpu_s(rds: redis.Redis) -> float:
    """CPU seconds the Redis server has used so far (user + system, all its threads)."""
    info = rds.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def overhead(http: httpx.Client, rds: redis.Redis, jobs: int) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 1}
    total, inside, pickup = [], [], []
    cpu_before = 0.0
    for i in range(jobs + 3):
        if i == 3:
            cpu_before = redis_cpu_s(rds)
        start = time.perf_counter()
        r = http.post("/v1/chat/completions", json=body)
        took = time.perf_counter() - start
        r.raise_for_status()
        job = r.json()["id"].removeprefix("chatcmpl-")
        result = orjson.loads(rds.get(f"arq:result:{job}") or b"{}")
        if i < 3 or not result:  # warm-up; a result already gone is skipped
            continue
        total.append(took)
        inside.append((result["ft"] - result["st"]) / 1000)
        pickup.append((result["st"] - result["et"]) / 1000)
    redis_ms = (redis_cpu_s(rds) - cpu_before) / jobs * 1000
    over = [t - j for t, j in zip(total, inside, strict=True)]
    print(f"queue overhead per job ({len(total)} one-token chat completions, one at a time): "
          f"client {statistics.median(total) * 1000:.1f} ms, in the worker "
          f"{statistics.median(inside) * 1000:.1f} ms -> overhead p50 "
          f"{statistics.median(over) * 1000:.1f} ms, p95 {pct(over, 0.95) * 1000:.1f} ms; "
          f"enqueue -> job start p50 {statistics.median(pickup) * 1000:.1f} ms; Redis CPU "
          f"{redis_ms:.2f} ms per job (one Redis core: ~{1000 / redis_ms:.0f} such jobs/s)",
          flush=True)


async def throughput(url: str, requests: int, tokens: int, concurrency: int) -> tuple[float, int]:
    """(wall seconds, completion tokens) for `requests` streams, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 1)

    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {"model": MODEL, "prompt": f"[{i}] Once upon a time", "max_tokens": tokens,
                "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        async with gate, client.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            used = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {") and (u := orjson.loads(line[6:]).get("usage")):
                    used = u["completion_tokens"]
            return used

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        used = await asyncio.gather(*(one(client, i) for i in range(requests)))
        return time.perf_counter() - start, sum(used)


def commandstats(rds: redis.Redis) -> dict[str, int]:
    return {k: v["calls"] for k, v in rds.info("commandstats").items()}


def wait_for_workers(rds: redis.Redis, count: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while len(rds.smembers(f"ferry:model:{MODEL}:workers")) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{count} workers did not come up")
        time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--overhead-jobs", type=int, default=50)
    args = p.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="ferry-scale-bench-"))
    port = free_port()
    with redis_url(dict(os.environ), logs) as url, Processes(logs) as procs:
        env = dict(os.environ, REDIS_URL=url, FERRY_DATA_DIR=str(logs / "data"),
                   FERRY_N_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
        ferry = [sys.executable, "-m", "ferry"]
        procs.start("web", [*ferry, "web", "--port", str(port)], env)
        procs.start("worker-0", [*ferry, "worker", "--cpu", "--model", MODEL], env)
        base = f"http://127.0.0.1:{port}"
        procs.wait_healthy("web", base)
        rds = redis.Redis.from_url(url)
        with httpx.Client(base_url=base, timeout=600) as http:
            overhead(http, rds, args.overhead_jobs)
        rows = []
        for n in (1, args.workers):
            for i in range(len(procs.procs) - 1, n):
                procs.start(f"worker-{i}", [*ferry, "worker", "--cpu", "--model", MODEL], env)
            wait_for_workers(rds, n)
            asyncio.run(throughput(base, args.concurrency, 8, args.concurrency))  # warm-up
            before, cpu = commandstats(rds), redis_cpu_s(rds)
            wall, used = asyncio.run(throughput(base, args.requests, args.tokens, args.concurrency))
            after, cpu = commandstats(rds), redis_cpu_s(rds) - cpu
            calls = {k: after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0)}
            rows.append((n, used / wall, calls, used, cpu))
        one = rows[0][1]
        print(f"\n{args.requests} streams x {args.tokens} tokens, {args.concurrency} at once, "
              f"{args.threads} thread(s) per worker:")
        for n, tps, *_ in rows:
            print(f"  {n} worker(s): {tps:7.1f} tokens/s aggregate  ({tps / one:.2f}x one worker, "
                  f"{tps / n:.1f} per worker)")
        n, _, calls, used, cpu = rows[-1]
        top = sorted(calls.items(), key=lambda kv: -kv[1])[:8]
        total = sum(calls.values())
        print(f"Redis commands with {n} workers: {total / args.requests:.0f} per job, "
              f"{total / used:.2f} per token; most: "
              + ", ".join(f"{k.removeprefix('cmdstat_')} {v / args.requests:.1f}/job"
                          for k, v in top))
        print(f"Redis CPU with {n} workers: {cpu / used * 1e6:.0f} us per streamed token "
              f"(jobs of {args.tokens} tokens; one Redis core: ~{used / cpu:.0f} tokens/s)")


if __name__ == "__main__":
    main()
