"""Real parts for every test: a Redis, a worker process with SmolLM2, and the web app on hypercorn.

A Redis is started on a free port unless REDIS_URL is set. Processes are started once per session
and shared; tests that kill a worker start their own, serving the same GGUF under another id.
FERRY_TEST_WORKER_ARGS adds arguments to every worker the tests start (`--gpu 0` runs them on a GPU).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from ferry.redis_server import EmbeddedRedis, free_port
from shared.redis import client
from shared.registry import models

SMOLLM = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[1]


def smollm_path() -> Path:
    return Path(models.resolve(SMOLLM, Path("/nonexistent")).path)


def own_model(tmp_path: Path, name: str) -> Path:
    """SmolLM2's file under a name of the test's own: only that test's worker serves it, so the
    test may kill or stop that worker without harm to the others."""
    link = tmp_path / f"{name}.gguf"
    link.symlink_to(smollm_path())
    return link


@pytest.fixture
def victim(tmp_path: Path) -> tuple[str, Path]:
    return "victim", own_model(tmp_path, "victim")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False)
    url = server.start()
    yield url
    server.stop()


@pytest.fixture(scope="session")
def env(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "FERRY_DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "FERRY_WORKER_WAIT_S": "1",
        # Each test's worker serves its own model; test_lifecycle turns auto-start back on.
        "FERRY_AUTO_START": "0",
        "FERRY_HEARTBEAT_S": "0.5",
        "FERRY_HEARTBEAT_TTL_S": "1.5",
        "FERRY_CTX_LEN": "2048",
        "FERRY_MAX_BODY_BYTES": "65536",
        "FERRY_MAX_MESSAGE_CHARS": "4000",
        "FERRY_RESUME_GRACE_S": "1",
        "PYTHONUNBUFFERED": "1",
    }


class Proc:
    """A Ferry child process whose output goes to a log file (shown when a test fails)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("wb")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "ferry", *args], env=env, cwd=ROOT,
            stdout=self._out, stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()


def start_worker(env: dict[str, str], model: str | None, log: Path, timeout_s: float = 60,
                 args: tuple[str, ...] = ()) -> Proc:
    """Start `ferry worker [--model MODEL]`; wait until its heartbeat shows the model loaded."""
    args = (*shlex.split(os.environ.get("FERRY_TEST_WORKER_ARGS", "")), *args)
    proc = Proc(["worker", *(["--model", model] if model else []), *args], env, log)
    r = client(env["REDIS_URL"])  # may name Sentinel
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            assert proc.p.poll() is None, f"worker exited: {log.read_text()[-2000:]}"
            beats = [r.get(k) for k in r.scan_iter("ferry:worker:*")]
            mine = [w for b in beats if b and (w := orjson.loads(b))["pid"] == proc.p.pid]
            if mine and (mine[0]["models"] or not model):
                return proc
            time.sleep(0.1)
    finally:
        r.close()
    proc.stop()
    raise TimeoutError(f"worker for {model} did not come up: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def worker(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_worker(env, SMOLLM, tmp_path_factory.mktemp("logs") / "worker.log")
    yield proc
    proc.stop()


@contextmanager
def moto_s3() -> Iterator[tuple[str, Any]]:
    """moto's S3-compatible server on loopback: its endpoint and a boto3 client for it."""
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "moto did not start"
                time.sleep(0.1)
        yield endpoint, boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                     aws_access_key_id="test", aws_secret_access_key="test")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def start_web(env: dict[str, str], log: Path) -> tuple[Proc, str]:
    """Start `ferry web` on a free port; wait until it answers /health."""
    port = free_port()
    web = Proc(["web", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code in (200, 503):
                return web, url
        except httpx.TransportError:
            time.sleep(0.1)
    web.stop()
    raise TimeoutError(f"web did not come up: {web.log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def base_url(env: dict[str, str], worker: Proc, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[str]:
    web, url = start_web(env, tmp_path_factory.mktemp("logs") / "web.log")
    yield url
    web.stop()


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


@pytest.fixture
def rds(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
