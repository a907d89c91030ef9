"""Batch benchmark: how long a batch of N chat requests takes, and what it does to interactive
requests' time to first token.

Starts a private Redis, a Ferry worker and a web process on loopback (as bench/stream.py does),
then: interactive TTFT on the idle server (--probes streams, one at a time), the batch alone
(upload → create → completed), and the same batch again with the same probes fired while it runs.
With --peer, llama-server (from `make peers`; same GGUF, threads, slots and context) also gets
the same requests from a client at --concurrency, after the batch alone, in the same run.

    python bench/batch.py [--lines 1000] [--tokens 16] [--probes 20] [--parallel 8] [--gpu N]
                          [--peer] [--concurrency 8 [16 ...]] [--streams 8] [--threads N] [--rounds 1]

Prints each round's wall time and output tokens/s (from usage) for the batch and the peer (at each
--concurrency; the ratio is to the best of them), the per-round ratios and their median, TTFT
p50/p95 of single probes idle and during the batch, and of --streams users streaming at once, idle
and during a batch (the last round's batch figures in the summary line).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stream import PEERS, Processes, device_env, pct, redis_url  # noqa: E402
from ferry.redis_server import free_port  # noqa: E402
from shared.registry.models import resolve  # noqa: E402

MODEL = "smollm2-135m-instruct"


def batch_file(lines: int, tokens: int, tag: str, model: str = MODEL) -> bytes:
    """`lines` chat requests, each its own prompt (`tag` keeps runs apart: no prompt cache hit)."""
    return b"".join(orjson.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "max_tokens": tokens, "ignore_eos": True, "messages": [
            {"role": "user", "content": f"{tag} request {i}: write a sentence about the sea."}]},
    }) + b"\n" for i in range(lines))


def run_batch(http: httpx.Client, data: bytes) -> tuple[float, dict[str, object]]:
    start = time.perf_counter()
    upload = http.post("/v1/files", data={"purpose": "batch"},
                       files={"file": ("bench.jsonl", data)}).json()
    batch = http.post("/v1/batches", json={"input_file_id": upload["id"], "completion_window":
                                           "24h", "endpoint": "/v1/chat/completions"}).json()
    while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.25)
        batch = http.get(f"/v1/batches/{batch['id']}").json()
    return time.perf_counter() - start, batch


def run_peer(url: str, data: bytes, concurrency: int) -> tuple[float, int]:
    """The batch's request bodies sent to `url` by `concurrency` clients: wall, output tokens."""
    bodies = [orjson.loads(line)["body"] for line in data.splitlines()]
    tokens = 0
    lock = threading.Lock()

    def client() -> None:
        nonlocal tokens
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    if not bodies:
                        return
                    body = bodies.pop()
                r = http.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                with lock:
                    tokens += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    return time.perf_counter() - start, tokens


def peers(url: str, args: argparse.Namespace, rnd: int) -> tuple[str, float]:
    """The peer at each --concurrency: what it did, and its best output tokens/s."""
    line, best = "", 0.0
    for c in args.concurrency:
        data = batch_file(args.lines, args.tokens, f"Peer{rnd}c{c}", args.model)
        peer_s, peer_tokens = run_peer(url, data, c)
        best = max(best, peer_tokens / peer_s)
        line += f", llama-server c{c} {peer_s:.1f} s ({peer_tokens / peer_s:.0f} tokens/s)"
    return line, best


def ttft(http: httpx.Client, i: int, model: str = MODEL) -> float:
    body = {"model": model, "max_tokens": 4, "stream": True, "messages": [
        {"role": "user", "content": f"Probe {i}: say hi."}]}
    start = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - start
                for _ in lines:
                    pass
                return first
    raise RuntimeError("no token came")


def probes(http: httpx.Client, count: int, gap_s: float = 0.5, model: str = MODEL) -> list[float]:
    out = []
    for i in range(count):
        out.append(ttft(http, i, model))
        time.sleep(gap_s)
    return out


def interactive(base: str, streams: int, count: int, gap_s: float = 0.5,
                model: str = MODEL) -> list[float]:
    """`streams` users at once, each streaming `count` short answers one after another, `gap_s`
    apart: every request's TTFT."""
    out: list[float] = []
    lock = threading.Lock()

    def user(u: int) -> None:
        with httpx.Client(base_url=base, timeout=600) as http:
            for i in range(count):
                first = ttft(http, u * 1000 + i, model)
                with lock:
                    out.append(first)
                time.sleep(gap_s)

    users = [threading.Thread(target=user, args=(u,)) for u in range(streams)]
    for t in users:
        t.start()
    for t in users:
        t.join()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--probes", type=int, default=20)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--gpu", type=int)
    p.add_argument("--peer", action="store_true", help="also llama-server, driven by a client")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8],
                   help="the peer's client concurrency: each round takes the best of these")
    p.add_argument("--streams", type=int, default=8,
                   help="interactive users streaming at once, idle and during the batch")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="both sides")
    p.add_argument("--ctx", type=int, default=4096, help="context, shared by the sequences")
    p.add_argument("--rounds", type=int, default=1, help="batch-alone (and peer) runs")
    p.add_argument("--model-path", type=Path, metavar="GGUF", help=f"default: bundled {MODEL}")
    args = p.parse_args()
    # The model's id in requests, the worker's --model, and the GGUF llama-server loads.
    record = resolve(str(args.model_path or MODEL), Path("/nonexistent"))
    args.model, worker_model = record.id, str(args.model_path.resolve()) if args.model_path else MODEL
    if args.peer and not (PEERS / "llama-server").is_file():
        p.error(f"{PEERS / 'llama-server'} is missing: run `make peers` first")
    logs = Path(tempfile.mkdtemp(prefix="ferry-batch-bench-"))
    env = dict(os.environ)
    port = free_port()
    with redis_url(env, logs) as url, Processes(logs) as procs:
        fenv = dict(os.environ, REDIS_URL=url, FERRY_DATA_DIR=str(logs / "data"),
                    FERRY_PARALLEL=str(args.parallel), FERRY_N_THREADS=str(args.threads),
                    FERRY_CTX_LEN=str(args.ctx), FERRY_N_BATCH="512", PYTHONUNBUFFERED="1")
        ferry = [sys.executable, "-m", "ferry"]
        device = ["--gpu", str(args.gpu)] if args.gpu is not None else ["--cpu"]
        procs.start("ferry-worker", [*ferry, "worker", "--model", worker_model, *device], fenv)
        procs.start("ferry-web", [*ferry, "web", "--port", str(port)], fenv)
        base = f"http://127.0.0.1:{port}"
        procs.wait_healthy("ferry-web", base)
        peer = f"http://127.0.0.1:{(peer_port := free_port())}"
        if args.peer:
            procs.start("llama-server", [
                str(PEERS / "llama-server"), "-m", record.path,
                "--host", "127.0.0.1", "--port", str(peer_port), "-np", str(args.parallel),
                "-kvu", "-c", str(args.ctx), "-b", "512", "-ub", "512", "-t", str(args.threads),
                "-tb", str(args.threads), "-ngl", "999" if args.gpu is not None else "0",
                "--alias", args.model, "--no-webui"], device_env(args.gpu))
            procs.wait_healthy("llama-server", peer)
        with httpx.Client(base_url=base, timeout=600) as http:
            probes(http, 3, model=args.model)  # warm up
            idle = probes(http, args.probes, model=args.model)
            idle_streams = interactive(base, args.streams, args.probes // 2, model=args.model)
            if args.peer:
                run_peer(peer, batch_file(16, 4, "Warm", args.model), max(args.concurrency))
            ratios = []
            for rnd in range(args.rounds):
                # each round: Ferry's batch alone and the peer, in turn first (drift hits both)
                peer_line, best = "", 0.0
                if args.peer and rnd % 2:
                    peer_line, best = peers(peer, args, rnd)
                time.sleep(2)  # the interactive probes' last jobs gone: the batch alone
                data = batch_file(args.lines, args.tokens, f"Alone{rnd}", args.model)
                alone_s, batch = run_batch(http, data)
                tokens = batch["usage"]["output_tokens"]  # type: ignore[index]
                if args.peer and not rnd % 2:
                    peer_line, best = peers(peer, args, rnd)
                line = f"round {rnd}: ferry {alone_s:.1f} s ({tokens / alone_s:.0f} tokens/s)"
                if args.peer:
                    ratios.append((tokens / alone_s) / best)
                    line += f"{peer_line}, ratio to the best {ratios[-1]:.2f}"
                print(line, flush=True)
            data = batch_file(args.lines, args.tokens, "Probed", args.model)
            during: list[float] = []
            prober = httpx.Client(base_url=base, timeout=600)
            runner = threading.Thread(target=lambda: during.extend(
                probes(prober, args.probes, gap_s=max(0.5, alone_s / args.probes / 2), model=args.model)))
            runner.start()
            loaded_s, _ = run_batch(http, data)
            runner.join()
            prober.close()
            # the same users as idle, while a batch as long as the first runs
            busy: list[float] = []
            users = threading.Thread(target=lambda: (time.sleep(3), busy.extend(
                interactive(base, args.streams, args.probes // 2, model=args.model))))
            users.start()
            streams_s, _ = run_batch(http, batch_file(args.lines, args.tokens, "Streams", args.model))
            users.join()
        counts = batch["request_counts"]
        print(f"batch of {args.lines} chat requests x {args.tokens} tokens: {alone_s:.1f} s "
              f"({counts['completed']} completed, {counts['failed']} failed; "  # type: ignore[index]
              f"{args.lines / alone_s:.1f} requests/s, {tokens / alone_s:.0f} tokens/s); "
              f"with probes: {loaded_s:.1f} s")
        if ratios:
            print(f"ferry / llama-server (client at its best of concurrency {args.concurrency}) "
                  f"output tokens/s, per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
                  f"median {statistics.median(ratios):.2f}x")
        print(f"interactive TTFT idle:         p50 {pct(idle, 0.5) * 1000:.0f} ms, "
              f"p95 {pct(idle, 0.95) * 1000:.0f} ms ({len(idle)} probes)")
        print(f"interactive TTFT during batch: p50 {pct(during, 0.5) * 1000:.0f} ms, "
              f"p95 {pct(during, 0.95) * 1000:.0f} ms ({len(during)} probes)")
        print(f"{args.streams} interactive users, TTFT idle: p50 {pct(idle_streams, 0.5) * 1000:.0f}"
              f" ms, p95 {pct(idle_streams, 0.95) * 1000:.0f} ms; during a batch "
              f"({streams_s:.1f} s): p50 {pct(busy, 0.5) * 1000:.0f} ms, p95 "
              f"{pct(busy, 0.95) * 1000:.0f} ms; p95 during / idle "
              f"{pct(busy, 0.95) / pct(idle_streams, 0.95):.2f}x ({len(busy)} requests)")


if __name__ == "__main__":
    main()
