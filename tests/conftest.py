"""Real parts for every test: a Redis, a worker process with SmolLM2, and the web app on hypercorn.

A Redis is started on a free port unless REDIS_URL is set. Processes are started once per session
and shared, and only when a test asks for one (tests/unit asks for none); tests that kill a worker
start their own, serving the same GGUF under another id. Helpers are in tests/helpers.py.
FERRY_TEST_WORKER_ARGS adds arguments to every worker the tests start (`--gpu 0` runs them on a GPU).

Every process a test starts inherits FERRY_TEST_SESSION; when the session ends, any process still
carrying it (a Ferry process, moto) or working in the session's temporary folders (a Redis or a
Sentinel: Redis writes its process title over its environment) fails the run, and is killed.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from ferry.redis_server import EmbeddedRedis
from tests.helpers import MINILM, SMOLLM, Proc, own_model, start_web, start_worker

SESSION_MARK = f"FERRY_TEST_SESSION={uuid.uuid4().hex}".encode()
os.environ["FERRY_TEST_SESSION"] = SESSION_MARK.split(b"=")[1].decode()


def leftovers(temp: Path | None) -> list[int]:
    """Live processes this session started, other than pytest's own: they carry its mark, or work
    in its temporary folders `temp`."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        pid = int(environ.parent.name)
        try:
            if pid == os.getpid():
                continue
            marked = SESSION_MARK in environ.read_bytes().split(b"\0")
            cwd = Path(os.readlink(environ.parent / "cwd"))
            if not marked and not (temp and cwd.is_relative_to(temp)):
                continue
            state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(pid)
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    temp = factory.getbasetemp().resolve() if factory and factory._basetemp else None
    deadline = time.monotonic() + 15  # children told to stop may take a moment
    while (left := leftovers(temp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        names = [(environ := Path(f"/proc/{p}/cmdline")).exists() and
                 environ.read_bytes().replace(b"\0", b" ").decode()[:120] for p in left]
        print(f"\nprocesses the tests started are still alive: {names}")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


@pytest.fixture(scope="session")
def worker(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_worker(env, SMOLLM, tmp_path_factory.mktemp("logs") / "worker.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def embedder(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """A second worker, serving the bundled embedding model (converted on its first load)."""
    proc = start_worker(env, MINILM, tmp_path_factory.mktemp("logs") / "embedder.log")
    yield proc
    proc.stop()


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
