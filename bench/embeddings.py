"""Embeddings benchmark: Ferry's `/v1/embeddings` against llama-server `--embeddings`, in one run.

Starts a private Redis, a Ferry worker (the bundled all-MiniLM-L6-v2, converted once to a BERT
GGUF) and web process, and llama-server (from `make peers`) on the same GGUF, threads and batch
size, with --parallel slots. At each concurrency level C, C clients take inputs from one list
and send them, --per-request inputs a request, until all --inputs are embedded. The inputs are
sentences of about --words words, each different, and both sides get the same ones. Rounds
alternate which side goes first, so drift on a busy machine hits both alike.

    make peers          # once: .peers/bin/llama-server
    python bench/embeddings.py [--levels 1 16] [--inputs 256] [--words 48] [--per-request 1]
                               [--rounds 3] [--parallel 16] [--threads N]

Prints per level and side the median inputs/s and prompt tokens/s (tokens from each answer's
usage) and the request latency p50/p95, then the per-round median of the ratio Ferry /
llama-server in inputs/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stream import PEERS, Processes, device_env, pct, redis_url  # noqa: E402
from ferry.redis_server import free_port  # noqa: E402
from shared.registry.models import resolve  # noqa: E402

MODEL = "all-minilm-l6-v2"
N_BATCH = 512  # FERRY_N_BATCH, and llama-server's -b and -ub
WORDS = ("river", "engine", "market", "garden", "signal", "winter", "coffee", "ladder", "planet",
         "silver", "museum", "forest", "letter", "bridge", "harbor", "circuit", "violin",
         "mirror", "candle", "thunder", "journey", "pocket", "island", "window", "shadow")


@dataclass
class Run:
    wall_s: float
    inputs: int
    tokens: int
    latencies_s: list[float]

    @property
    def inputs_per_s(self) -> float:
        return self.inputs / self.wall_s


def sentences(tag: str, count: int, words: int) -> list[str]:
    """`count` different sentences of about `words` words (seeded by `tag`)."""
    rng = random.Random(tag)
    return [f"{tag} {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) + "."
            for i in range(count)]


async def level(url: str, texts: list[str], concurrency: int, per_request: int) -> Run:
    chunks = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    latencies: list[float] = []
    tokens = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while chunks:
            chunk = chunks.pop()
            t0 = time.perf_counter()
            r = await client.post("/v1/embeddings", json={
                "model": MODEL, "input": chunk if per_request > 1 else chunk[0],
                "encoding_format": "float"})
            r.raise_for_status()
            body = r.json()
            latencies.append(time.perf_counter() - t0)
            assert len(body["data"]) == len(chunk), body
            tokens += body["usage"]["prompt_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return Run(wall, len(texts), tokens, latencies)


async def measure(args: argparse.Namespace, sides: dict[str, str]) -> None:
    for url in sides.values():  # warm both: first decodes, connections
        await level(url, sentences("warm", 16, args.words), 4, 1)
    print(f"\n{args.inputs} inputs of ~{args.words} words a level, {args.per_request} a request, "
          f"{args.rounds} rounds, {args.threads} threads, parallel={args.parallel}\n")
    print(f"{'conc':>4} {'side':>13} {'inputs/s':>9} {'tokens/s':>9} {'p50 ms':>8} {'p95 ms':>8}")
    for conc in args.levels:
        runs: dict[str, list[Run]] = {name: [] for name in sides}
        for rnd in range(args.rounds):
            order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
            for name in order:
                texts = sentences(f"c{conc}r{rnd}", args.inputs, args.words)  # same for both
                runs[name].append(await level(sides[name], texts, conc, args.per_request))
        for name, rs in runs.items():
            lat = [s * 1000 for r in rs for s in r.latencies_s]
            print(f"{conc:>4} {name:>13} {statistics.median(r.inputs_per_s for r in rs):>9.1f} "
                  f"{statistics.median(r.tokens / r.wall_s for r in rs):>9.0f} "
                  f"{pct(lat, .5):>8.1f} {pct(lat, .95):>8.1f}")
        ratios = [f.inputs_per_s / s.inputs_per_s
                  for f, s in zip(runs["ferry"], runs["llama-server"], strict=True)]
        same = all(f.tokens == s.tokens for f, s in zip(runs["ferry"], runs["llama-server"],
                                                        strict=True))
        print(f"     ferry / llama-server inputs/s, per round: "
              f"{', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}x"
              f"{'' if same else ' (token counts differ!)'}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    p.add_argument("--inputs", type=int, default=256, help="inputs embedded per level and round")
    p.add_argument("--words", type=int, default=48, help="words an input, about")
    p.add_argument("--per-request", type=int, default=1, help="inputs a request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parallel", type=int, default=16, help="llama-server's slots")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    if not (PEERS / "llama-server").is_file():
        p.error(f"{PEERS / 'llama-server'} is missing: run `make peers` first")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on SIGTERM too
    ferry_port, llama_port = free_port(), free_port()
    with TemporaryDirectory(prefix="ferry-bench-") as tmp, \
            redis_url(dict(os.environ), Path(tmp)) as url, Processes(Path(tmp)) as procs:
        gguf = resolve(MODEL, Path(tmp) / "models").path  # converted here; the worker finds it
        env = dict(os.environ, REDIS_URL=url, FERRY_DATA_DIR=tmp, FERRY_AUTH="false",
                   FERRY_N_THREADS=str(args.threads), FERRY_N_BATCH=str(N_BATCH),
                   PYTHONUNBUFFERED="1")
        ferry = [sys.executable, "-m", "ferry"]
        procs.start("ferry-worker", [*ferry, "worker", "--model", MODEL, "--cpu"], env)
        procs.start("ferry-web", [*ferry, "web", "--port", str(ferry_port)], env)
        procs.start("llama-server", [
            str(PEERS / "llama-server"), "-m", gguf, "--embeddings", "--host", "127.0.0.1",
            "--port", str(llama_port), "-np", str(args.parallel), "-kvu", "-c", str(N_BATCH),
            "-b", str(N_BATCH), "-ub", str(N_BATCH), "-t", str(args.threads),
            "-tb", str(args.threads), "-ngl", "0", "--alias", MODEL, "--no-webui"],
            device_env(None))
        sides = {"ferry": f"http://127.0.0.1:{ferry_port}",
                 "llama-server": f"http://127.0.0.1:{llama_port}"}
        for name, side in sides.items():
            procs.wait_healthy("ferry-web" if name == "ferry" else name, side)
        asyncio.run(measure(args, sides))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the servers are stopped by now
        sys.exit(130)
