"""Child processes that never outlive the process that started them, the one a killed
`ferry serve` left anyway (a Redis from before this fix, or one started by hand) found and stopped,
and one `ferry serve` at a time on a data folder.

Linux sends a child `PR_SET_PDEATHSIG`'s signal when its parent dies, however it dies (SIGKILL
included); elsewhere only an orderly shutdown stops the children.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PIDFILE = "redis.pid"
LOCKFILE = "serve.lock"


class FolderTaken(RuntimeError):
    """Another live process serves this data folder."""


def hold(data_dir: Path) -> int:
    """Take `data_dir` for this process's lifetime: the kernel lets go of the lock when it dies,
    however it dies, so a live owner is the only thing that refuses. The lock's file descriptor
    (keep it open); FolderTaken names the owner."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCKFILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode().strip() or "?"
        os.close(fd)
        raise FolderTaken(f"another `ferry serve` (pid {owner}) is running on {data_dir}; stop it "
                          "first, or give this one another FERRY_DATA_DIR") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def die_with_parent() -> None:
    """Runs in the child before exec (`preexec_fn`): ask Linux to SIGTERM it when its parent
    dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (AttributeError, OSError):
        pass  # not Linux


def record(data_dir: Path, pid: int) -> None:
    """Note the Redis serving `data_dir`, for a later run that finds it still alive."""
    (data_dir / PIDFILE).write_text(str(pid))


def stop_leftover(data_dir: Path, timeout_s: float = 10.0) -> int | None:
    """Stop a Redis an earlier run left serving `data_dir` (SIGTERM: it writes its data first);
    its pid, or None if there was none."""
    try:
        pid = int((data_dir / PIDFILE).read_text())
        # Redis renames its process ("redis-server 127.0.0.1:port") and works in its data folder
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, ValueError):
        return None
    server = Path(title.split(" ")[0]).name
    if not ("redis" in server or "valkey" in server) or cwd != str(data_dir.resolve()):
        return None  # the pid is some other process now
    log.warning("a Redis (pid %d) from an earlier run still serves %s: stopping it first",
                pid, data_dir)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            break  # ended; its parent has not reaped it
        time.sleep(0.05)
    else:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    return pid
