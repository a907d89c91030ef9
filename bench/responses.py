"""Responses benchmark: a `/v1/responses` stream against a `/v1/chat/completions` stream on Ferry,
in one run, on one worker.

Starts a private Redis, a Ferry worker and a web process on loopback (as bench/stream.py does).
At each concurrency level C, C clients stream a user message through each API (greedy, the same
--tokens limit); rounds alternate which API goes first. The prompts differ per client, round and
API, so no prompt cache favours either side.

    python bench/responses.py [--levels 1 8] [--tokens 128] [--rounds 4] [--parallel 8]

Prints per level TTFT p50/p95 (submit -> first text), the median per-stream decode tokens/s, the
median aggregate tokens/s, and the per-round median of the ratio Responses / Chat. Tokens are
counted from each answer's usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stream import BUNDLED, Processes, Run, Sample, pct, prompts, redis_url  # noqa: E402
from ferry.redis_server import free_port  # noqa: E402


async def chat(client: httpx.AsyncClient, prompt: str, tokens: int, t0: float) -> Sample:
    body = {"model": BUNDLED, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": tokens, "temperature": 0, "stream_options": {"include_usage": True}}

    def read(data: dict[str, Any]) -> tuple[bool, int | None]:
        text = bool(data.get("choices") and data["choices"][0]["delta"].get("content"))
        return text, data["usage"]["completion_tokens"] if data.get("usage") else None

    return await timed(client, "/v1/chat/completions", body, read, t0)


async def responses(client: httpx.AsyncClient, prompt: str, tokens: int, t0: float) -> Sample:
    body = {"model": BUNDLED, "input": prompt, "stream": True, "max_output_tokens": tokens,
            "temperature": 0, "store": False}

    def read(data: dict[str, Any]) -> tuple[bool, int | None]:
        text = data["type"] == "response.output_text.delta" and bool(data["delta"])
        ended = data["type"] in ("response.completed", "response.incomplete")
        return text, data["response"]["usage"]["output_tokens"] if ended else None

    return await timed(client, "/v1/responses", body, read, t0)


async def timed(client: httpx.AsyncClient, path: str, body: dict[str, Any],
                read: Callable[[dict[str, Any]], tuple[bool, int | None]], t0: float) -> Sample:
    """Stream `body` to `path`; `read` says of each event whether it carried text, and the
    output tokens once its usage comes."""
    stamps, used = [], 0
    async with client.stream("POST", path, json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                text, tokens = read(orjson.loads(line[6:]))
                if text:
                    stamps.append(time.perf_counter())
                used = tokens if tokens is not None else used
    return sample(stamps, used, t0)


def sample(stamps: list[float], used: int, t0: float) -> Sample:
    if not stamps or not used:
        raise RuntimeError(f"{used} tokens in {len(stamps)} chunks")
    decode = (used - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return Sample(stamps[0] - t0, decode, used)


async def level(url: str, api, batch: list[str], tokens: int) -> Run:  # type: ignore[no-untyped-def]
    limits = httpx.Limits(max_connections=len(batch) + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        samples = await asyncio.gather(*(api(client, p, tokens, start) for p in batch))
        return Run(list(samples), time.perf_counter() - start)


async def measure(args: argparse.Namespace, url: str) -> None:
    apis = {"chat": chat, "responses": responses}
    for api in apis.values():
        await level(url, api, prompts("warm", 2), 8)
    print(f"\n{args.tokens} tokens at most a stream, greedy, {args.rounds} rounds a level, "
          f"parallel={args.parallel}\n")
    print(f"{'conc':>4} {'API':>10} {'TTFT p50':>9} {'TTFT p95':>9} {'stream tok/s':>13} "
          f"{'aggr tok/s':>11}")
    for conc in args.levels:
        runs: dict[str, list[Run]] = {"chat": [], "responses": []}
        for rnd in range(args.rounds):
            for name in (["chat", "responses"] if rnd % 2 == 0 else ["responses", "chat"]):
                batch = prompts(f"{name}.{conc}.{rnd}", conc)  # its own: no prefix cache hit
                runs[name].append(await level(url, apis[name], batch, args.tokens))
        for name, rs in runs.items():
            samples = [s for r in rs for s in r.samples]
            ttft = [s.ttft_s * 1000 for s in samples]
            print(f"{conc:>4} {name:>10} {pct(ttft, .5):>9.1f} {pct(ttft, .95):>9.1f} "
                  f"{statistics.median(s.decode_tps for s in samples):>13.1f} "
                  f"{statistics.median(r.aggregate_tps for r in rs):>11.1f}")
        tokens = {n: sum(s.tokens for r in rs for s in r.samples) for n, rs in runs.items()}
        ratios = [r.aggregate_tps / c.aggregate_tps
                  for r, c in zip(runs["responses"], runs["chat"], strict=True)]
        ttft_ratios = [statistics.median(s.ttft_s for s in r.samples)
                       / statistics.median(s.ttft_s for s in c.samples)
                       for r, c in zip(runs["responses"], runs["chat"], strict=True)]
        print(f"     responses / chat, per-round median: aggregate {statistics.median(ratios):.1%}"
              f", TTFT p50 {statistics.median(ttft_ratios):.2f}x; tokens {tokens['responses']} "
              f"vs {tokens['chat']}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on SIGTERM too
    port = free_port()
    with TemporaryDirectory(prefix="ferry-bench-") as tmp, \
            redis_url(dict(os.environ), Path(tmp)) as url, Processes(Path(tmp)) as procs:
        env = dict(os.environ, REDIS_URL=url, FERRY_DATA_DIR=tmp, FERRY_AUTH="false",
                   FERRY_PARALLEL=str(args.parallel), FERRY_N_THREADS=str(args.threads),
                   PYTHONUNBUFFERED="1")
        ferry = [sys.executable, "-m", "ferry"]
        procs.start("ferry-worker", [*ferry, "worker", "--model", BUNDLED, "--cpu"], env)
        procs.start("ferry-web", [*ferry, "web", "--port", str(port)], env)
        procs.wait_healthy("ferry-web", f"http://127.0.0.1:{port}")
        asyncio.run(measure(args, f"http://127.0.0.1:{port}"))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
