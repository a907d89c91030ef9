"""Streaming benchmark: Ferry's queue path against llama-cpp-python in-process, side by side.

Both sides load the same GGUF with the same settings (context, batch, threads, logits) and serve
one generation at a time; at concurrency C, C clients submit at once and wait their turn. Rounds
alternate between the two sides so drift on a busy machine hits both alike. Prints TTFT p50/p95,
per-stream decode tokens/s, and aggregate tokens/s, with Ferry/in-process ratios.

    python bench/stream.py [--tokens 64] [--requests 8] [--levels 1 4 8] [--gpu N]

With --gpu N both sides offload every layer to GPU N alone (the worker gets `--gpu N`);
without it both run on the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ferry.redis_server import EmbeddedRedis, free_port  # noqa: E402
from shared.models import resolve  # noqa: E402
from shared.settings import Settings  # noqa: E402

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


@dataclass
class Sample:
    ttft_s: float  # submit -> first content token
    decode_tps: float  # tokens/s after the first token, for this stream
    tokens: int


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(round(q * (len(ordered) - 1))), len(ordered) - 1)]


# In-process: one Llama, one generation at a time, as a single-model server would hold it.

class InProcess:
    def __init__(self, settings: Settings, gpu: int | None) -> None:
        import llama_cpp

        # The same placement as a worker pinned with --gpu N (workers/engine.py), or none.
        device = ({"n_gpu_layers": settings.n_gpu_layers, "main_gpu": gpu,
                   "split_mode": llama_cpp.LLAMA_SPLIT_MODE_NONE} if gpu is not None
                  else {"n_gpu_layers": 0})
        path = resolve(MODEL, settings.models_path).path
        self.llm = llama_cpp.Llama(
            model_path=path, n_ctx=settings.ctx_len, n_batch=settings.n_batch,
            n_threads=settings.n_threads, logits_all=settings.logprobs, verbose=False,
            **device)  # type: ignore[arg-type]
        self.lock = threading.Lock()
        self.no_eos = {self.llm.token_eos(): float("-inf")}

    def one(self, tokens: int, submitted: float) -> Sample:
        with self.lock:
            stamps = []
            for chunk in self.llm.create_chat_completion(
                messages=MESSAGES, max_tokens=tokens, temperature=0, stream=True,
                logit_bias=self.no_eos,
            ):
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
        return _sample(submitted, stamps)

    async def run(self, concurrency: int, tokens: int) -> tuple[list[Sample], float]:
        start = time.perf_counter()
        samples = await asyncio.gather(*[
            asyncio.to_thread(self.one, tokens, start) for _ in range(concurrency)
        ])
        return list(samples), time.perf_counter() - start


# Ferry: real HTTP to `ferry web`, a real worker process, a real Redis.

class Ferry:
    def __init__(self, url: str) -> None:
        self.url = url

    async def one(self, client: httpx.AsyncClient, tokens: int, submitted: float) -> Sample:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        stamps = []
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    choices = orjson.loads(line[6:])["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        stamps.append(time.perf_counter())
        return _sample(submitted, stamps)

    async def run(self, concurrency: int, tokens: int) -> tuple[list[Sample], float]:
        limits = httpx.Limits(max_connections=concurrency + 1)
        async with httpx.AsyncClient(base_url=self.url, timeout=300, limits=limits) as client:
            start = time.perf_counter()
            samples = await asyncio.gather(*[
                self.one(client, tokens, start) for _ in range(concurrency)
            ])
            return list(samples), time.perf_counter() - start


def _sample(submitted: float, stamps: list[float]) -> Sample:
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return Sample(stamps[0] - submitted, decode, len(stamps))


def start_ferry(env: dict[str, str], port: int, logs: Path, gpu: int | None
                ) -> list[subprocess.Popen[bytes]]:
    ferry = [sys.executable, "-m", "ferry"]
    device = ["--gpu", str(gpu)] if gpu is not None else ["--cpu"]
    procs = [
        subprocess.Popen([*ferry, "worker", "--model", MODEL, *device], env=env, cwd=ROOT,
                         stdout=(logs / "worker.log").open("wb"), stderr=subprocess.STDOUT),
        subprocess.Popen([*ferry, "web", "--port", str(port)], env=env, cwd=ROOT,
                         stdout=(logs / "web.log").open("wb"), stderr=subprocess.STDOUT),
    ]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return procs
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"Ferry did not start; see {logs}")


async def measure(args: argparse.Namespace, inproc: InProcess, ferry: Ferry) -> None:
    # Warm both sides (first-call allocations, page cache) before anything is timed.
    await inproc.run(1, 8)
    await ferry.run(1, 8)
    results: dict[tuple[str, int], list[tuple[list[Sample], float]]] = {}
    for level in args.levels:
        for _ in range(max(args.requests // level, 1)):
            for name, side in (("in-process", inproc), ("ferry", ferry)):
                results.setdefault((name, level), []).append(await side.run(level, args.tokens))

    device = f"GPU {args.gpu}" if args.gpu is not None else f"CPU, threads={inproc.llm.n_threads}"
    print(f"\n{args.tokens} tokens per stream, {args.requests} streams per level, {device}\n")
    head = (f"{'conc':>4} {'side':<11} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12} "
            f"{'stream tok/s':>13} {'aggregate tok/s':>16}")
    print(head)
    print("-" * len(head))
    summary: dict[tuple[str, int], tuple[float, float, float, float]] = {}
    for level in args.levels:
        for name in ("in-process", "ferry"):
            runs = results[(name, level)]
            samples = [s for run, _ in runs for s in run]
            ttft = [s.ttft_s * 1000 for s in samples]
            per_stream = statistics.median(s.decode_tps for s in samples)
            aggregate = statistics.median(sum(s.tokens for s in run) / wall for run, wall in runs)
            row = (pct(ttft, 0.5), pct(ttft, 0.95), per_stream, aggregate)
            summary[(name, level)] = row
            print(f"{level:>4} {name:<11} {row[0]:>12.1f} {row[1]:>12.1f} {row[2]:>13.1f} "
                  f"{row[3]:>16.1f}")
        f, i = summary[("ferry", level)], summary[("in-process", level)]
        print(f"{level:>4} {'ferry/inproc':<11} {f'{f[0] - i[0]:+.1f} ms':>12} "
              f"{f'{f[1] - i[1]:+.1f} ms':>12} {f[2] / i[2]:>12.1%} {f[3] / i[3]:>15.1%}")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--gpu", type=int, metavar="N", help="offload to GPU N (both sides)")
    args = p.parse_args()

    with TemporaryDirectory() as tmp:
        logs = Path(tmp)
        env = dict(os.environ, FERRY_DATA_DIR=tmp, FERRY_CTX_LEN="2048", PYTHONUNBUFFERED="1")
        redis = None
        if not env.get("REDIS_URL"):
            redis = EmbeddedRedis(logs / "redis", persist=False)
            env["REDIS_URL"] = redis.start()
        settings = Settings(_env_file=None, ctx_len=2048)
        port = free_port()
        procs = start_ferry(env, port, logs, args.gpu)
        try:
            inproc = InProcess(settings, args.gpu)
            asyncio.run(measure(args, inproc, Ferry(f"http://127.0.0.1:{port}")))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=15)
            if redis is not None:
                redis.stop()


if __name__ == "__main__":
    main()
