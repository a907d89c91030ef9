"""`ferry serve`, as a newcomer runs it: its own Redis, a supervised worker, a clean Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ferry.redis_server import free_port
from tests.helpers import ROOT, SMOLLM


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_healthy(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("ferry serve did not become healthy")


def start_serve(tmp_path: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env |= {"FERRY_DATA_DIR": str(tmp_path), "FERRY_HEARTBEAT_TTL_S": "1.5",
            "FERRY_CTX_LEN": "1024"}
    port = free_port()
    with (tmp_path / f"{name}.log").open("wb") as log:
        serve = subprocess.Popen([sys.executable, "-m", "ferry", "serve", "--port", str(port)],
                                 env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return serve, f"http://127.0.0.1:{port}"


def test_serve_restarts_a_dead_worker_and_stops_cleanly(tmp_path: Path) -> None:
    serve, url = start_serve(tmp_path, "first")
    try:
        wait_healthy(url)
        kids = children_of(serve.pid)
        assert any("redis-server" in cmdline(k) or "valkey" in cmdline(k) for k in kids)
        worker = next(k for k in kids if "ferry worker" in cmdline(k))
        body = {"model": SMOLLM, "prompt": "Hi", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200

        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            new = [k for k in children_of(serve.pid) if "ferry worker" in cmdline(k)]
            if new and new[0] != worker:
                break
            assert time.monotonic() < deadline, "the dead worker was not restarted"
            time.sleep(0.2)
        # The dead worker's heartbeat outlives it by up to its TTL, so /health alone could still
        # be answering for it: wait until the new worker itself holds the model.
        while not any(w["pid"] == new[0] and w["models"] for w in
                      httpx.get(f"{url}/v1/status", timeout=5).json()["workers"]):
            assert time.monotonic() < deadline, "the new worker never loaded the model"
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text

        everything = children_of(serve.pid)
        serve.send_signal(signal.SIGINT)  # Ctrl-C
        assert serve.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while any(alive(p) for p in everything):
            assert time.monotonic() < deadline, [cmdline(p) for p in everything if alive(p)]
            time.sleep(0.1)
        assert (tmp_path / "redis" / "appendonlydir").is_dir()  # the embedded Redis persisted
    finally:
        if serve.poll() is None:
            serve.kill()


def test_threads_survive_a_restart_of_ferry_and_its_redis(tmp_path: Path) -> None:
    serve, url = start_serve(tmp_path, "first")
    try:
        wait_healthy(url)
        assert httpx.get(f"{url}/health").json()["persistence"] == "aof"
        thread = httpx.post(f"{url}/v1/threads", json={"title": "keep me"}).json()
        message = httpx.post(f"{url}/v1/threads/{thread['id']}/messages",
                             json={"role": "user", "content": "remember this"}).json()
        assistant = httpx.post(f"{url}/v1/assistants", json={"name": "kept"}).json()
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
    serve, url = start_serve(tmp_path, "second")
    try:
        wait_healthy(url)
        assert httpx.get(f"{url}/v1/threads/{thread['id']}").json()["title"] == "keep me"
        listed = httpx.get(f"{url}/v1/threads/{thread['id']}/messages").json()["data"]
        assert listed == [message]
        assert httpx.get(f"{url}/v1/assistants/{assistant['id']}").json()["name"] == "kept"
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)


def test_embedded_redis_restarts_and_keeps_what_was_stored(tmp_path: Path) -> None:
    serve, url = start_serve(tmp_path, "serve")
    try:
        wait_healthy(url)
        thread = httpx.post(f"{url}/v1/threads", json={"title": "durable"}).json()
        time.sleep(1.5)  # the append-only file is fsynced every second
        redis_pid = next(k for k in children_of(serve.pid)
                         if "redis-server" in cmdline(k) or "valkey" in cmdline(k))
        os.kill(redis_pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # Redis back, workers reconnected (or restarted), web answering
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Ferry did not recover from a Redis restart"
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/threads/{thread['id']}").json()["title"] == "durable"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)


def test_a_killed_serve_leaves_no_child_and_its_redis_is_stopped_by_the_next(tmp_path: Path) -> None:
    """SIGKILL gives the supervisor no chance to stop anything: its children end by themselves
    (the parent-death signal). A Redis left on the data folder anyway (one started without that
    signal) is stopped by the next `ferry serve`, which says so. While a serve lives, a second one
    on its data folder refuses to start and leaves the first one's Redis alone."""
    serve, url = start_serve(tmp_path, "killed")
    try:
        wait_healthy(url)
        kids = children_of(serve.pid)
        assert len(kids) == 3  # Redis, worker, web
        second, _ = start_serve(tmp_path, "beside")
        assert second.wait(timeout=30) == 1
        said = (tmp_path / "beside.log").read_text()
        assert f"another `ferry serve` (pid {serve.pid}) is running on" in said, said
        assert all(alive(k) for k in kids) and children_of(second.pid) == []
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        serve.kill()
        serve.wait()
    deadline = time.monotonic() + 10
    while left := [k for k in kids if alive(k)]:
        assert time.monotonic() < deadline, [cmdline(k) for k in left]
        time.sleep(0.1)

    from ferry.redis_server import EmbeddedRedis
    orphan = EmbeddedRedis(tmp_path / "redis")
    orphan.start()
    assert orphan.proc is not None
    orphan_pid = orphan.proc.pid  # its parent (this test) lives on: only the next serve stops it
    serve, url = start_serve(tmp_path, "second")
    try:
        wait_healthy(url)
        assert not alive(orphan_pid)
        assert f"pid {orphan_pid}" in (tmp_path / "second.log").read_text()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
        orphan.stop()
