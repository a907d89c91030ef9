"""Streaming benchmark: Ferry against llama.cpp's own llama-server, side by side in one run.

Starts a private Redis, a Ferry worker and web process, and llama-server (built by `make peers`),
all on loopback, with the same GGUF, threads, batch size and total context: one unified KV cache
of --ctx tokens shared by --parallel sequences on both sides, and --cache-ram MiB of host memory
for idle sequences' caches. At each concurrency level C, C clients stream /v1/completions at once
(--tokens tokens each, greedy, ignore_eos). The prompts differ per client and round, so no prompt
cache makes a stream trivial, and both sides get the same ones. Rounds alternate which side goes
first, so drift on a busy machine hits both alike.

    make peers          # once: .peers/bin/llama-server and llama-batched-bench
    python bench/stream.py [--levels 1 4 8 16] [--tokens 128] [--rounds 2] [--parallel N]
                           [--ctx 4096] [--cache-ram 1024] [--threads N] [--gpu N]
                           [--model-path GGUF]
                           [--short N] [--batched-bench] [--logs DIR]

Prints one row per level: TTFT p50/p95 (submit -> first text), the median per-stream decode
tokens/s (after the first token), aggregate tokens/s (all tokens / the level's wall time) for
each side, and the ratios Ferry / llama-server; then the median of the per-round aggregate
ratios (each round runs both sides back to back, so the machine's drift between rounds cancels
out). Tokens are the usage's completion_tokens on both sides. --short N also fires N streams
of 4 tokens, 16 at a time, at each side and prints the wall times. --batched-bench first prints
llama-batched-bench's table for the same GGUF: the engine with no server around it, the
ceiling. --gpu N puts every layer on GPU N on both sides; without it both run on the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import NoReturn

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ferry.lifeline import die_with_parent  # noqa: E402
from ferry.redis_server import EmbeddedRedis, free_port  # noqa: E402
from shared.registry.models import resolve  # noqa: E402

PEERS = ROOT / ".peers" / "bin"
BUNDLED = "smollm2-135m-instruct"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
N_BATCH = 512  # FERRY_N_BATCH, and llama-server's -b and -ub (llama-cpp-python's n_ubatch is 512)
SHORT_TOKENS, SHORT_CONCURRENCY = 4, 16


@dataclass
class Sample:
    ttft_s: float  # submit -> first non-empty text
    decode_tps: float  # tokens/s after the first token, for this stream
    tokens: int  # usage.completion_tokens


@dataclass
class Run:
    samples: list[Sample]
    wall_s: float

    @property
    def aggregate_tps(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(round(q * (len(ordered) - 1))), len(ordered) - 1)]


def prompts(tag: str, count: int) -> list[str]:
    """`count` distinct prompts; the same tag gives both sides the same set."""
    return [f"[{tag}.{i}] {PROMPT}" for i in range(count)]


# One server under test: both speak OpenAI's streaming /v1/completions.

@dataclass
class Side:
    name: str
    url: str
    model: str

    def client(self, concurrency: int) -> httpx.AsyncClient:
        # A fresh connection per request on both sides: llama-server answers a stream with
        # `Keep-Alive` and then closes the connection, so a reused one fails (curl retries).
        limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=0)
        return httpx.AsyncClient(base_url=self.url, timeout=600, limits=limits)

    async def stream(self, client: httpx.AsyncClient, prompt: str, tokens: int,
                     submitted: float) -> Sample:
        body = {"model": self.model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        stamps: list[float] = []
        used = 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"{self.name}: HTTP {r.status_code}: {r.text[:300]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = orjson.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
                if chunk.get("usage"):
                    used = chunk["usage"]["completion_tokens"]
        if not stamps or used != tokens:
            raise RuntimeError(f"{self.name}: {used} tokens in {len(stamps)} chunks, "
                               f"asked for {tokens}")
        decode = (used - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
        return Sample(stamps[0] - submitted, decode, used)

    async def level(self, batch: list[str], tokens: int) -> Run:
        """Every prompt submitted at once."""
        async with self.client(len(batch)) as client:
            start = time.perf_counter()
            samples = await asyncio.gather(*(self.stream(client, p, tokens, start) for p in batch))
            return Run(list(samples), time.perf_counter() - start)

    async def short(self, count: int) -> float:
        """`count` short streams, SHORT_CONCURRENCY in flight at a time; the wall time."""
        gate = asyncio.Semaphore(SHORT_CONCURRENCY)

        async def one(client: httpx.AsyncClient, prompt: str) -> None:
            async with gate:
                await self.stream(client, prompt, SHORT_TOKENS, time.perf_counter())

        async with self.client(SHORT_CONCURRENCY) as client:
            start = time.perf_counter()
            await asyncio.gather(*(one(client, p) for p in prompts("short", count)))
            return time.perf_counter() - start


# The processes: each in its own session, so Ctrl-C reaches only this script, which stops them;
# each also ends if this script dies some other way (SIGKILL, say).

class Processes(ExitStack):
    def __init__(self, logs: Path) -> None:
        super().__init__()
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = self.enter_context((self.logs / f"{name}.log").open("wb"))
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=die_with_parent)
        self.procs[name] = proc
        self.callback(stop, proc)

    def wait_healthy(self, name: str, url: str, timeout_s: float = 300) -> None:
        """Until `url`/health answers 200; if any process exits first, its log's tail."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if dead := [n for n, proc in self.procs.items() if proc.poll() is not None]:
                self.fail(dead[0], "exited")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.fail(name, f"not healthy after {timeout_s:.0f} s")

    def fail(self, name: str, why: str) -> NoReturn:
        tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"{name} {why}; the end of its log:\n" + "\n".join(tail))


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def redis_url(env: dict[str, str], logs: Path) -> Iterator[str]:
    """REDIS_URL from the environment, or a private Redis for this run."""
    if env.get("REDIS_URL"):
        yield env["REDIS_URL"]
        return
    redis = EmbeddedRedis(logs / "redis", persist=False)
    try:
        yield redis.start()
    finally:
        redis.stop()


def start_ferry(procs: Processes, args: argparse.Namespace, model: str, url: str,
                data_dir: Path) -> None:
    env = dict(os.environ, REDIS_URL=url, FERRY_DATA_DIR=str(data_dir), FERRY_AUTH="false",
               FERRY_CTX_LEN=str(args.ctx), FERRY_PARALLEL=str(args.parallel),
               FERRY_N_THREADS=str(args.threads), FERRY_N_BATCH=str(N_BATCH),
               FERRY_CACHE_RAM_MB=str(args.cache_ram), PYTHONUNBUFFERED="1")
    ferry = [sys.executable, "-m", "ferry"]
    device = ["--gpu", str(args.gpu)] if args.gpu is not None else ["--cpu"]
    procs.start("ferry-worker", [*ferry, "worker", "--model", model, *device], env)
    procs.start("ferry-web", [*ferry, "web", "--port", str(args.ferry_port)], env)


def device_env(gpu: int | None) -> dict[str, str]:
    """llama.cpp's binaries see GPU N alone, or none at all."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="" if gpu is None else str(gpu))


def start_llama_server(procs: Processes, args: argparse.Namespace, gguf: str) -> None:
    argv = [str(PEERS / "llama-server"), "-m", gguf, "--host", "127.0.0.1",
            "--port", str(args.llama_port),
            "-np", str(args.parallel), "-kvu", "-c", str(args.ctx),  # one cache, Ferry's size
            "-b", str(N_BATCH), "-ub", str(N_BATCH),
            "-t", str(args.threads), "-tb", str(args.threads),
            "-ngl", "999" if args.gpu is not None else "0",
            "--cache-ram", str(args.cache_ram),  # idle slots' caches in host memory, as Ferry
            "--no-webui"]
    procs.start("llama-server", argv, device_env(args.gpu))


def batched_bench(args: argparse.Namespace, gguf: str, logs: Path) -> None:
    npl = ",".join(map(str, args.levels))
    ctx = max(args.ctx, max(args.levels) * (128 + args.tokens))
    argv = [str(PEERS / "llama-batched-bench"), "-m", gguf, "-c", str(ctx),
            "-b", str(N_BATCH), "-ub", str(N_BATCH), "-npp", "128", "-ntg", str(args.tokens),
            "-npl", npl, "-kvu", "-t", str(args.threads), "-tb", str(args.threads),
            "-ngl", "999" if args.gpu is not None else "0"]
    print("$ " + shlex.join(argv), flush=True)
    with (logs / "batched-bench.log").open("wb") as log:
        out = subprocess.run(argv, env=device_env(args.gpu), stdout=subprocess.PIPE, stderr=log,
                             stdin=subprocess.DEVNULL, check=True, timeout=1800,
                             preexec_fn=die_with_parent)
    print(out.stdout.decode().strip() + "\n", flush=True)


# Measuring and reporting.

async def measure(args: argparse.Namespace, sides: list[Side]) -> dict[tuple[str, int], list[Run]]:
    for side in sides:  # first-call allocations, page cache: before anything is timed
        await side.level(prompts("warm", min(4, args.parallel)), 8)
    results: dict[tuple[str, int], list[Run]] = {}
    for level in args.levels:
        for rnd in range(args.rounds):
            batch = prompts(f"{level}.{rnd}", level)
            for side in sides if rnd % 2 == 0 else sides[::-1]:
                results.setdefault((side.name, level), []).append(
                    await side.level(batch, args.tokens))
    return results


def summarize(runs: list[Run]) -> tuple[float, float, float, float]:
    """TTFT p50 and p95 (ms), median per-stream tok/s, median aggregate tok/s."""
    samples = [s for run in runs for s in run.samples]
    ttft = [s.ttft_s * 1000 for s in samples]
    return (pct(ttft, 0.5), pct(ttft, 0.95), statistics.median(s.decode_tps for s in samples),
            statistics.median(run.aggregate_tps for run in runs))


def report(args: argparse.Namespace, results: dict[tuple[str, int], list[Run]]) -> None:
    device = f"GPU {args.gpu}" if args.gpu is not None else "CPU"
    print(f"\n{args.tokens} tokens a stream, {args.rounds} rounds a level, {device}, "
          f"threads={args.threads}, parallel={args.parallel}, ctx={args.ctx} (unified)\n")
    print(f"{'':5}{'TTFT p50 ms':^16}{'TTFT p95 ms':^16}{'stream tok/s':^16}"
          f"{'aggregate tok/s':^18}{'Ferry / llama-server':^28}")
    head = (f"{'conc':>4} " + f"{'ferry':>7} {'llama':>7} " * 3 + f"{'ferry':>8} {'llama':>8} "
            + f"{'aggr':>8} {'stream':>8} {'TTFT p50':>9}")
    print(head)
    print("-" * len(head))
    for level in args.levels:
        f, ll = summarize(results[("ferry", level)]), summarize(results[("llama-server", level)])
        cells = "".join(f"{f[i]:>7.1f} {ll[i]:>7.1f} " for i in range(3))
        print(f"{level:>4} {cells}{f[3]:>8.1f} {ll[3]:>8.1f} "
              f"{f[3] / ll[3]:>8.1%} {f[2] / ll[2]:>8.1%} {f[0] / ll[0]:>8.2f}x")
    # Each round's two runs are next to each other in time: their ratio cancels the machine's
    # drift between rounds, which the medians of each side above do not.
    print("\naggregate Ferry / llama-server, round by round (median, quartiles):")
    for level in args.levels:
        ratios = [f.aggregate_tps / ll.aggregate_tps for f, ll in
                  zip(results[("ferry", level)], results[("llama-server", level)], strict=True)]
        print(f"{level:>4}  {statistics.median(ratios):.1%} "
              f"({pct(ratios, 0.25):.1%} - {pct(ratios, 0.75):.1%}, {len(ratios)} rounds)")
    print()


async def short_mode(count: int, sides: list[Side]) -> None:
    walls = {side.name: await side.short(count) for side in sides}
    print(f"{count} short streams ({SHORT_TOKENS} tokens each, {SHORT_CONCURRENCY} at a time), wall: "
          + ", ".join(f"{name} {wall:.2f} s" for name, wall in walls.items())
          + f", ferry / llama-server {walls['ferry'] / walls['llama-server']:.2f}x\n")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrencies")
    p.add_argument("--tokens", type=int, default=128, help="tokens a stream")
    p.add_argument("--rounds", type=int, default=2, help="runs of each level on each side")
    p.add_argument("--parallel", type=int, help="sequences a context holds (default: top level)")
    p.add_argument("--ctx", type=int, default=4096, help="total context, shared by all sequences")
    p.add_argument("--cache-ram", type=int, default=1024, metavar="MIB",
                   help="host memory for idle sequences' caches, both sides (0: none)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads, both sides")
    p.add_argument("--gpu", type=int, metavar="N", help="every layer on GPU N (both sides)")
    p.add_argument("--model-path", type=Path, metavar="GGUF", help=f"default: bundled {BUNDLED}")
    p.add_argument("--short", type=int, metavar="N", help=f"also N streams of {SHORT_TOKENS} tokens")
    p.add_argument("--batched-bench", action="store_true", help="run llama-batched-bench first")
    p.add_argument("--logs", type=Path, help="keep every process's log here (default: discarded)")
    args = p.parse_args()
    args.parallel = args.parallel or max(args.levels)
    if args.parallel * (args.tokens + 32) > args.ctx:
        p.error(f"--ctx {args.ctx} is too small for {args.parallel} streams of {args.tokens} tokens")
    for binary in ("llama-server", "llama-batched-bench"):
        if not (PEERS / binary).is_file():
            p.error(f"{PEERS / binary} is missing: run `make peers` first")
    args.ferry_port, args.llama_port = free_port(), free_port()
    return args


def main() -> None:
    args = parse()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on SIGTERM too
    if args.model_path is not None:
        record = resolve(str(args.model_path), Path("/nonexistent"))
        gguf, ferry_model, model_id = record.path, str(args.model_path.resolve()), record.id
    else:
        gguf, ferry_model, model_id = resolve(BUNDLED, Path("/nonexistent")).path, BUNDLED, BUNDLED
    with TemporaryDirectory(prefix="ferry-bench-") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        if args.batched_bench:
            batched_bench(args, gguf, logs)
        with redis_url(dict(os.environ), logs) as url, Processes(logs) as procs:
            start_ferry(procs, args, ferry_model, url, Path(tmp))
            start_llama_server(procs, args, gguf)
            procs.wait_healthy("ferry-web", f"http://127.0.0.1:{args.ferry_port}")
            procs.wait_healthy("llama-server", f"http://127.0.0.1:{args.llama_port}")
            sides = [Side("ferry", f"http://127.0.0.1:{args.ferry_port}", model_id),
                     Side("llama-server", f"http://127.0.0.1:{args.llama_port}", model_id)]
            report(args, asyncio.run(measure(args, sides)))
            if args.short:
                asyncio.run(short_mode(args.short, sides))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the servers are stopped by now
        sys.exit(130)
