"""Prometheus metrics kept in Redis, so one scrape of any web process shows every process.

Web processes count requests by route and status; workers record each job's outcome, tokens,
time to first token and decode speed into cumulative histogram buckets. `render` turns the hashes
into Prometheus' text format, adding what is read live: queue depths and workers alive.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from shared import keys
from shared.fleet import liveness
from shared.registry import models

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
TPS_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 500, 1000)  # tokens per second
PACKED_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # embedding jobs sharing one decode


async def count_request(redis: Redis, method: str, route: str, status: int) -> None:
    await redis.hincrby(keys.METRICS_REQUESTS, f"{method}\t{route}\t{status}", 1)


async def record_job(redis: Redis, model: str, outcome: str, tokens: int,
                     ttft_s: float | None, decode_s: float | None,
                     routed: tuple[str, int] | None = None) -> None:
    """A generation job's figures; `routed`: its route's decision, and how many of its prompt's
    tokens the worker found cached."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hincrby(keys.METRICS_JOBS, f"{model}\t{outcome}", 1)
        if routed is not None:
            pipe.hincrby(keys.METRICS_ROUTES, f"{model}\t{routed[0]}\tcached", routed[1])
        pipe.hincrby(keys.METRICS_TOKENS, model, tokens)
        if ttft_s is not None:
            _observe(pipe, keys.metrics_histogram("ttft", model), TTFT_BUCKETS, ttft_s)
        if decode_s and tokens > 1:
            _observe(pipe, keys.metrics_histogram("tps", model), TPS_BUCKETS,
                     (tokens - 1) / decode_s)
        await pipe.execute()


def record_embedding(pipe: Any, model: str, outcome: str, packed: list[int]) -> None:
    """Queue on `pipe` an embedding job's outcome, and how many jobs each decode since the last
    record held (the worker sends them with the job's answer, in one round trip)."""
    pipe.hincrby(keys.METRICS_JOBS, f"{model}\t{outcome}", 1)
    for jobs in packed:
        _observe(pipe, keys.metrics_histogram("packed", model), PACKED_BUCKETS, jobs)


def count_route(pipe: Any, model: str, decision: str) -> None:
    """Queue on `pipe`: a handler sent a job to a worker (`functions.queue.route`), for a hit,
    miss or busy (it rides with the job's enqueue)."""
    pipe.hincrby(keys.METRICS_ROUTES, f"{model}\t{decision}\tjobs", 1)


async def count_no_worker(redis: Redis, model: str) -> None:
    """A request refused because no worker serves `model`: the demand a pool scaled to zero
    cannot show in its queue."""
    await redis.hincrby(keys.METRICS_NO_WORKER, model, 1)


def _observe(pipe: object, key: str, buckets: tuple[float, ...], value: float) -> None:
    for bound in buckets:
        if value <= bound:
            pipe.hincrby(key, str(bound), 1)  # type: ignore[attr-defined]
    pipe.hincrby(key, "+Inf", 1)  # type: ignore[attr-defined]
    pipe.hincrbyfloat(key, "sum", value)  # type: ignore[attr-defined]


async def render(redis: Redis) -> str:
    out: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])

    family("ferry_http_requests_total", "counter", "HTTP requests by route and status")
    for field, n in sorted((await redis.hgetall(keys.METRICS_REQUESTS)).items()):
        method, route, status = field.decode().split("\t")
        out.append(f'ferry_http_requests_total{{method="{method}",route="{_esc(route)}",'
                   f'status="{status}"}} {int(n)}')
    family("ferry_jobs_total", "counter", "Generation and embedding jobs by model and outcome")
    for field, n in sorted((await redis.hgetall(keys.METRICS_JOBS)).items()):
        model, outcome = field.decode().split("\t")
        out.append(f'ferry_jobs_total{{model="{model}",outcome="{outcome}"}} {int(n)}')
    family("ferry_tokens_generated_total", "counter", "Completion tokens generated")
    for model_b, n in sorted((await redis.hgetall(keys.METRICS_TOKENS)).items()):
        out.append(f'ferry_tokens_generated_total{{model="{model_b.decode()}"}} {int(n)}')

    records = await models.all_models(redis)
    for name, kind, buckets, help_ in (
        ("ferry_time_to_first_token_seconds", "ttft", TTFT_BUCKETS,
         "From enqueue to the first token"),
        ("ferry_decode_tokens_per_second", "tps", TPS_BUCKETS, "Decode speed of a job"),
        ("ferry_embedding_jobs_per_decode", "packed", PACKED_BUCKETS,
         "Embedding requests whose inputs shared one llama_decode"),
    ):
        family(name, "histogram", help_)
        for record in records:
            raw = {k.decode(): v for k, v in
                   (await redis.hgetall(keys.metrics_histogram(kind, record.id))).items()}
            if not raw:
                continue
            label = f'model="{record.id}"'
            for bound in buckets:
                out.append(f'{name}_bucket{{{label},le="{bound}"}} {int(raw.get(str(bound), 0))}')
            total = int(raw.get("+Inf", 0))
            out.append(f'{name}_bucket{{{label},le="+Inf"}} {total}')
            out.append(f"{name}_sum{{{label}}} {float(raw.get('sum', 0))}")
            out.append(f"{name}_count{{{label}}} {total}")

    routes = sorted((k.decode().split("\t"), int(n))
                    for k, n in (await redis.hgetall(keys.METRICS_ROUTES)).items())
    for name, part, help_ in (
        ("ferry_route_decisions_total", "jobs", "Jobs routed among a model's workers, by "
         "decision: hit (to the cache holding the prompt's start), miss, busy (its cache's "
         "worker was loaded)"),
        ("ferry_route_cached_tokens_total", "cached", "Prompt tokens of routed jobs that their "
         "worker found cached, by route decision"),
    ):
        family(name, "counter", help_)
        for (model, decision, what), n in routes:
            if what == part:
                out.append(f'{name}{{model="{_esc(model)}",decision="{decision}"}} {n}')

    family("ferry_requests_without_worker_total", "counter",
           "Requests refused (503 no_worker) because no worker served their model")
    for model_b, n in sorted((await redis.hgetall(keys.METRICS_NO_WORKER)).items()):
        out.append(f'ferry_requests_without_worker_total{{model="{_esc(model_b.decode())}"}} {int(n)}')

    family("ferry_queue_depth", "gauge", "Jobs queued or running per model")
    for record in records:
        out.append(f'ferry_queue_depth{{model="{record.id}"}} {await redis.zcard(keys.queue(record.id))}')
    workers = await liveness.all_workers(redis)
    family("ferry_workers_alive", "gauge", "Workers with a live heartbeat")
    out.append(f"ferry_workers_alive {len(workers)}")
    family("ferry_model_loaded", "gauge", "Workers holding each model")
    for record in records:
        holders = sum(record.id in w.model_ids for w in workers)
        out.append(f'ferry_model_loaded{{model="{record.id}"}} {holders}')
    return "\n".join(out) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
