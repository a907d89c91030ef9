"""The suite's own check for processes the tests leave behind (tests/conftest.py) sees a Redis,
whose process title overwrites the environment that marks the other processes."""

from __future__ import annotations

import time
from pathlib import Path

from ferry.redis_server import EmbeddedRedis
from tests.conftest import leftovers


def test_a_redis_left_running_is_found_by_its_folder(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persist=False)
    server.start()
    try:
        assert server.proc is not None
        assert server.proc.pid in leftovers(tmp_path.resolve())
    finally:
        server.stop()
    deadline = time.monotonic() + 5
    while server.proc.pid in leftovers(tmp_path.resolve()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
