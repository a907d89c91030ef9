"""Multi-turn chat benchmark: U users each hold a T-turn chat behind one long shared system prompt,
resending their history every turn; what share of later turns' prompts the server found cached,
and those turns' time to first token.

In one run, on loopback, one after another (each configuration its own prompts, so none reuses
another's cache):

1. llama-server (from `make peers`), one instance: --users users;
2. Ferry, one worker: --users users;
3. Ferry, two workers on one Redis, with cache routing: 2 x --users users (the same load per
   worker);
4. the same two workers behind a web process with routing off (FERRY_CACHE_ROUTING=false): any
   worker takes any turn, as before routing.

Every server gets --threads threads per worker (default 1: two workers on two cores), --parallel
sequences and --ctx context.

    python bench/multiturn.py [--users 4] [--turns 4] [--tokens 32] [--threads 1] [--parallel 8]

Prints per configuration: later turns' cached share (cached / prompt tokens, from usage), their
TTFT p50 and p95, the wall time, and the ratios against one Ferry worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stream import PEERS, Processes, pct, redis_url, stop  # noqa: E402
from ferry.redis_server import free_port  # noqa: E402
from shared.registry.models import resolve  # noqa: E402

MODEL = "smollm2-135m-instruct"
TOPICS = ["tides", "cranes", "anchors", "ropes", "lighthouses", "tugboats", "charts", "buoys",
          "knots", "sails", "harbours", "ferries", "storms", "currents", "docks", "gulls"]


def system_prompt(tag: str) -> str:
    rules = " ".join(f"Rule {i}: when asked about item {i} of the {tag} manual, quote it, explain "
                     f"it in plain words and give one example from the port." for i in range(12))
    return f"You are the {tag} harbour office's assistant. {rules}"


@dataclass
class Turns:
    """Later turns' figures (turn 2 on): time to first token, prompt and cached tokens."""

    ttft: list[float] = field(default_factory=list)
    prompt: int = 0
    cached: int = 0
    wall: float = 0.0

    @property
    def share(self) -> float:
        return self.cached / self.prompt if self.prompt else 0.0


async def turn(client: httpx.AsyncClient, messages: list[dict[str, str]], tokens: int
               ) -> tuple[float, str, int, int]:
    """One streamed turn: (TTFT s, text, prompt tokens, cached tokens)."""
    body = {"model": MODEL, "messages": messages, "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, text, usage, timings = 0.0, [], {}, {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            for choice in chunk.get("choices") or []:
                if piece := (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter() - start
                    text.append(piece)
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None:  # llama-server without the field: its timings say what it reused
        cached = timings.get("cache_n", 0)
    return first, "".join(text), usage.get("prompt_tokens", 0), cached


async def chats(url: str, users: int, turns: int, tokens: int, tag: str) -> Turns:
    out = Turns()
    system = system_prompt(tag)

    async def user(client: httpx.AsyncClient, u: int) -> None:
        messages = [{"role": "system", "content": system}]
        for t in range(turns):
            messages.append({"role": "user", "content": f"User {u} ({TOPICS[u % len(TOPICS)]}), "
                                                        f"question {t}: tell me about item {t + u}."})
            ttft, text, prompt, cached = await turn(client, messages, tokens)
            messages.append({"role": "assistant", "content": text})
            if t:
                out.ttft.append(ttft)
                out.prompt += prompt
                out.cached += cached

    # A connection per turn: llama-server closes kept-alive connections that httpx may reuse
    # just then ("Server disconnected without sending a response").
    limits = httpx.Limits(max_connections=users + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(user(client, u) for u in range(users)))
        out.wall = time.perf_counter() - start
    return out


def ferry_env(args: argparse.Namespace, url: str, data: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, REDIS_URL=url, FERRY_DATA_DIR=str(data), FERRY_PARALLEL=str(args.parallel),
                FERRY_N_THREADS=str(args.threads), FERRY_CTX_LEN=str(args.ctx),
                FERRY_N_BATCH="512", PYTHONUNBUFFERED="1", **extra)


def wait_workers(http: httpx.Client, count: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = http.get("/v1/status").json()
        if sum(MODEL in [m["id"] for m in w["models"]] for w in status["workers"]) >= count:
            return
        time.sleep(0.5)
    raise SystemExit(f"{count} workers did not come up")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=4, help="users per worker")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32, help="tokens an answer")
    p.add_argument("--threads", type=int, default=1, help="per worker, and llama-server's")
    p.add_argument("--parallel", type=int, default=8, help="sequences per worker")
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--no-peer", action="store_true", help="leave llama-server out")
    args = p.parse_args()
    peer_bin = PEERS / "llama-server"
    if not args.no_peer and not peer_bin.is_file():
        p.error(f"{peer_bin} is missing: run `make peers` first, or pass --no-peer")
    logs = Path(tempfile.mkdtemp(prefix="ferry-multiturn-bench-"))
    results: dict[str, Turns] = {}
    with redis_url(dict(os.environ), logs) as url, Processes(logs) as procs:
        if not args.no_peer:
            port = free_port()
            procs.start("llama-server", [
                str(peer_bin), "-m", resolve(MODEL, Path("/nonexistent")).path, "--host",
                "127.0.0.1", "--port", str(port), "-np", str(args.parallel), "-kvu", "-c",
                str(args.ctx), "-b", "512", "-ub", "512", "-t", str(args.threads), "-tb",
                str(args.threads), "-ngl", "0", "--cache-ram", "1024", "--alias", MODEL,
                "--no-webui"], dict(os.environ, CUDA_VISIBLE_DEVICES=""))
            procs.wait_healthy("llama-server", f"http://127.0.0.1:{port}")
            asyncio.run(chats(f"http://127.0.0.1:{port}", 2, 2, 4, "warm-up"))
            results["llama-server, 1 instance"] = asyncio.run(
                chats(f"http://127.0.0.1:{port}", args.users, args.turns, args.tokens, "peer"))
            stop(procs.procs.pop("llama-server"))  # its cores go back before Ferry's run
        data = logs / "data"
        ferry = [sys.executable, "-m", "ferry"]
        routed, plain = free_port(), free_port()
        procs.start("web-routed", [*ferry, "web", "--port", str(routed)], ferry_env(args, url, data))
        procs.start("web-plain", [*ferry, "web", "--port", str(plain)],
                    ferry_env(args, url, data, FERRY_CACHE_ROUTING="false"))
        procs.start("worker-1", [*ferry, "worker", "--cpu", "--model", MODEL], ferry_env(args, url, data))
        base_routed, base_plain = f"http://127.0.0.1:{routed}", f"http://127.0.0.1:{plain}"
        procs.wait_healthy("web-routed", base_routed)
        procs.wait_healthy("web-plain", base_plain)
        with httpx.Client(base_url=base_routed, timeout=60) as http:
            wait_workers(http, 1)
            asyncio.run(chats(base_routed, 2, 2, 4, "warm-up"))
            results["ferry, 1 worker"] = asyncio.run(
                chats(base_routed, args.users, args.turns, args.tokens, "one"))
            procs.start("worker-2", [*ferry, "worker", "--cpu", "--model", MODEL],
                        ferry_env(args, url, data))
            wait_workers(http, 2)
            asyncio.run(chats(base_routed, 4, 2, 4, "warm-up-2"))
            results["ferry, 2 workers, cache routing"] = asyncio.run(
                chats(base_routed, 2 * args.users, args.turns, args.tokens, "routed"))
            results["ferry, 2 workers, no routing"] = asyncio.run(
                chats(base_plain, 2 * args.users, args.turns, args.tokens, "plain"))
            metrics = http.get("/metrics").text
    report(args, results)
    print("\n".join(line for line in metrics.splitlines() if line.startswith("ferry_route_")))


def report(args: argparse.Namespace, results: dict[str, Turns]) -> None:
    print(f"\n{args.users} users per worker x {args.turns} turns, {args.tokens} tokens an answer, "
          f"{args.threads} thread(s) per worker; later turns (2 on):\n")
    print("| configuration | users | cached share | TTFT p50 ms | TTFT p95 ms | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        users = args.users * (2 if "2 workers" in name else 1)
        print(f"| {name} | {users} | {r.share:.1%} | {pct(r.ttft, 0.5) * 1000:.0f} | "
              f"{pct(r.ttft, 0.95) * 1000:.0f} | {r.wall:.1f} |")
    one = results["ferry, 1 worker"]
    print("\nagainst one Ferry worker (cached share in points; TTFT p95 as a ratio):")
    for name, r in results.items():
        if r is not one:
            print(f"- {name}: cached share {100 * (r.share - one.share):+.1f} points, "
                  f"TTFT p50 {pct(r.ttft, 0.5) / pct(one.ttft, 0.5):.2f}x, "
                  f"p95 {pct(r.ttft, 0.95) / pct(one.ttft, 0.95):.2f}x")


if __name__ == "__main__":
    main()
