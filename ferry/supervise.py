"""`ferry serve`: one web process, one worker, and a private Redis when none is set.

Children run in their own sessions, so Ctrl-C reaches only the supervisor, which stops them in
order (web and workers first, Redis last). A child that dies is restarted. Each child also gets
SIGTERM from the kernel if the supervisor itself dies, the embedded Redis too, so nothing is left
behind (`ferry.lifeline`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from ferry import lifeline
from ferry.models_cli import URL_FILE
from ferry.redis_server import EmbeddedRedis
from shared.settings import Settings

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, env=self.env, start_new_session=True, preexec_fn=lifeline.die_with_parent
        )
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def serve(settings: Settings, models: list[str]) -> int:
    env = dict(os.environ)
    redis_server = None
    if settings.redis_url is None:
        try:  # one serve per data folder: a second would stop the first one's Redis
            lifeline.hold(settings.data_dir / "redis")
        except lifeline.FolderTaken as e:
            log.error("%s", e)
            return 1
        redis_server = EmbeddedRedis(settings.data_dir / "redis", persist=True)
        env["REDIS_URL"] = redis_server.start()
        (redis_server.data_dir / URL_FILE).write_text(env["REDIS_URL"])  # for `ferry models`
        log.info("embedded Redis at %s (data in %s)", env["REDIS_URL"], redis_server.data_dir)
    ferry = [sys.executable, "-m", "ferry"]
    preload = [arg for m in models for arg in ("--model", m)]
    children = [
        Child("worker", [*ferry, "worker", *preload], env),
        Child("web", [*ferry, "web", "--host", settings.host, "--port", str(settings.port)], env),
    ]

    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        for child in children:
            child.start()
        log.info("Ferry on http://%s:%d (Ctrl-C stops it)", settings.host, settings.port)
        while not stopping:
            if redis_server is not None and not redis_server.alive():
                log.warning("the embedded Redis exited; restarting it on the same port")
                redis_server.start()
            for child in children:
                if not child.alive() and not stopping:
                    _restart(child)
            time.sleep(0.2)
    finally:
        _stop_all(children, settings.drain_s + 15)  # each drains its streams and jobs first
        if redis_server is not None:
            redis_server.stop()
    return 0


def _restart(child: Child) -> None:
    code = child.proc.returncode if child.proc else None
    # A child that ran for a while gets a fresh backoff; one that dies at once waits longer.
    if time.monotonic() - child.started_at > 30:
        child.restarts = 0
    delay = RESTART_BACKOFF_S[min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
    log.warning("%s exited (%s); restarting in %.1fs", child.name, code, delay)
    time.sleep(delay)
    child.restarts += 1
    child.start()


def _stop_all(children: list[Child], timeout_s: float) -> None:
    for child in children:
        if child.alive():
            assert child.proc is not None
            child.proc.terminate()
    deadline = time.monotonic() + timeout_s
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", child.name)
            child.proc.kill()
            child.proc.wait()
