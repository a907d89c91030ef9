"""Prometheus metrics kept in Redis, so one scrape of any web process shows every process.

Web processes count requests by route and status; workers record each job's outcome, tokens,
time to first token and decode speed into cumulative histogram buckets. `render` turns the hashes
into Prometheus' text format, adding what is read live: queue depths and workers alive.
"""

from __future__ import annotations

from redis.asyncio import Redis

from shared import keys
from shared.fleet import liveness
from shared.registry import models

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
TPS_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 500, 1000)  # tokens per second


async def count_request(redis: Redis, method: str, route: str, status: int) -> None:
    await redis.hincrby(keys.METRICS_REQUESTS, f"{method}\t{route}\t{status}", 1)


async def record_job(redis: Redis, model: str, outcome: str, tokens: int,
                     ttft_s: float | None, decode_s: float | None) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hincrby(keys.METRICS_JOBS, f"{model}\t{outcome}", 1)
        pipe.hincrby(keys.METRICS_TOKENS, model, tokens)
        if ttft_s is not None:
            _observe(pipe, keys.metrics_histogram("ttft", model), TTFT_BUCKETS, ttft_s)
        if decode_s and tokens > 1:
            _observe(pipe, keys.metrics_histogram("tps", model), TPS_BUCKETS,
                     (tokens - 1) / decode_s)
        await pipe.execute()


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
    family("ferry_jobs_total", "counter", "Generation jobs by model and outcome")
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
