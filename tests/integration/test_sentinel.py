"""REDIS_URL naming Redis Sentinel: web and worker find the master through the sentinels, and
survive a failover (the master killed, its replica promoted) without a restart. Real
redis-server processes: a master, a replica and three sentinels, on loopback."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from ferry.redis_server import free_port, server_binary
from shared.jobs import entry_number
from shared.redis import sentinels
from tests.helpers import own_model, start_web, start_worker
from tests.integration.test_redis_restart import MODEL, read, text

MASTER = "mymaster"


def test_sentinel_urls_parse() -> None:
    s = sentinels("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2,[::1]:26380/mymaster/2")
    assert s is not None
    assert s.hosts == [("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380)]
    assert (s.master, s.db, s.password, s.username, s.ssl) == ("mymaster", 2, "pw", None, False)
    assert sentinels("rediss+sentinel://s1:26379/cache").ssl  # type: ignore[union-attr]
    assert sentinels("redis://127.0.0.1:6379/0") is None
    with pytest.raises(ValueError):
        sentinels("redis+sentinel://s1:26379")  # no master name


class Servers:
    """Every redis-server process of one test; all stopped at the end, pass or fail."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        folder = self.root / name
        folder.mkdir()
        p = subprocess.Popen([server_binary(), *args, "--logfile", str(folder / "log")],
                             cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, httpx.HTTPError):
            pass
        time.sleep(0.1)
    raise TimeoutError(what)


@dataclass
class SentinelSet:
    url: str  # the REDIS_URL naming the sentinels
    master: subprocess.Popen[bytes]
    master_port: int
    sentinel_ports: list[int]


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    """A master with one replica, watched by three sentinels (quorum 2)."""
    servers = Servers(tmp_path)
    try:
        master, replica = free_port(), free_port()
        plain = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
        first = servers.start("master", "--port", str(master), *plain)
        servers.start("replica", "--port", str(replica), *plain,
                      "--replicaof", "127.0.0.1", str(master))
        ports = [free_port() for _ in range(3)]
        for i, port in enumerate(ports):
            conf = tmp_path / f"sentinel{i}.conf"  # a sentinel rewrites its own config file
            conf.write_text(f"port {port}\nbind 127.0.0.1\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {master} 2\n"
                            f"sentinel down-after-milliseconds {MASTER} 1000\n"
                            f"sentinel failover-timeout {MASTER} 10000\n")
            servers.start(f"sentinel{i}", str(conf), "--sentinel")
        clients = [redis.Redis(port=p, decode_responses=True) for p in ports]

        def ready() -> bool:  # each sentinel knows the replica and the two other sentinels
            return all(len(c.sentinel_slaves(MASTER)) == 1 and len(c.sentinel_sentinels(MASTER)) == 2
                       for c in clients)

        wait_for("sentinels ready", ready, 60)
        for c in clients:
            c.close()
        hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
        yield SentinelSet(f"redis+sentinel://{hosts}/{MASTER}/0", first, master, ports)
    finally:
        servers.stop()


def test_web_and_worker_survive_a_failover(
    sentinel_set: SentinelSet, env: dict[str, str], tmp_path: Path
) -> None:
    env = {**env, "REDIS_URL": sentinel_set.url}
    worker = start_worker(env, str(own_model(tmp_path, "ha")), tmp_path / "worker.log")
    web, base = start_web(env, tmp_path / "web.log")
    try:
        body = {"model": "ha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        with httpx.Client(base_url=base, timeout=30) as http:
            assert http.post("/v1/chat/completions", json=body).status_code == 200
            thread = http.post("/v1/threads", json={"metadata": {"kept": "yes"}}).json()["id"]

            with redis.Redis(port=sentinel_set.master_port) as old:
                assert old.wait(1, 5000) == 1  # the replica has everything written so far
            sentinel_set.master.kill()
            killed_at = time.monotonic()

            def served() -> bool:
                return http.post("/v1/chat/completions", json=body).status_code == 200

            wait_for("a completion after the failover", served, 60)
            took = time.monotonic() - killed_at

            with redis.Redis(port=sentinel_set.sentinel_ports[0]) as sentinel:
                now = sentinel.sentinel_get_master_addr_by_name(MASTER)
            assert int(now[1]) != sentinel_set.master_port  # the replica was promoted
            assert worker.p.poll() is None and web.p.poll() is None  # nobody restarted
            assert http.get(f"/v1/threads/{thread}").json()["metadata"] == {"kept": "yes"}
            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                assert list(r.iter_lines())[-2] == "data: [DONE]"
            assert http.get("/health").status_code == 200
        print(f"served again {took:.1f} s after the master was killed")
    finally:
        web.stop()
        worker.stop()



def test_a_stream_goes_on_through_a_failover(
    sentinel_set: SentinelSet, env: dict[str, str], tmp_path: Path
) -> None:
    """The master killed mid-stream: the worker holds what it generates until the replica is
    promoted, the web process reads on, and the client gets the answer an undisturbed run gives,
    every chunk once. Replication is asynchronous, so the replica may lack the stream's last
    entries: then the stream ends with `stream_lost`, never with a gap."""
    env = {**env, "REDIS_URL": sentinel_set.url, "FERRY_STREAM_INTERVAL_MS": "0"}
    worker = start_worker(env, str(own_model(tmp_path, MODEL)), tmp_path / "worker.log")
    web, base = start_web(env, tmp_path / "web.log")
    try:
        _, calm = read(base)
        ids, datas = read(base, kill_after=5, on_kill=sentinel_set.master.kill)
        assert sentinel_set.master.poll() is not None  # the master died mid-stream
        numbers = [entry_number(i) for i in ids if i]
        assert numbers == sorted(set(numbers)), "a chunk came twice, or out of order"
        print(f"through the failover: {datas[-1].get('error') or 'the whole answer'}")
        if "error" in datas[-1]:
            assert datas[-1]["error"]["code"] == "stream_lost", datas[-1]
            assert calm and text(calm).startswith(text(datas[:-1]))
        else:
            assert text(datas) == text(calm) and len(text(calm)) > 100
            finishes = [d["choices"][0]["finish_reason"] for d in datas if d.get("choices")]
            assert finishes[-1] == "length"
        assert worker.p.poll() is None and web.p.poll() is None  # nobody restarted
    finally:
        web.stop()
        worker.stop()
