"""Which llama.cpp build a node runs, and what it refuses: `make install` picks CUDA where it can,
a worker asked for a GPU on a CPU-only build will not start, and the build is shown."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers import ROOT, Proc
from workers.engine import backend


def make_install_plan(**variables: str) -> str:
    """What `make install` would run (dry run, every step as if out of date)."""
    args = [f"{k}={v}" for k, v in variables.items()]
    out = subprocess.run(["make", "-n", "-B", "install", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout


def test_make_install_builds_cuda_where_asked_and_says_which_build() -> None:
    cuda = make_install_plan(CUDA="1", CUDA_ARCH="90")
    assert "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" in cuda
    assert "--no-cache-dir --force-reinstall --no-deps llama-cpp-python==" in cuda
    assert ".ferry-installed-cuda" in cuda
    cpu = make_install_plan(CUDA="0")
    assert "GGML_CUDA" not in cpu and ".ferry-installed-cpu" in cpu
    assert "llama.cpp build:" in cpu and "llama.cpp build:" in cuda


@pytest.mark.skipif(backend.offloads(), reason="this llama-cpp-python offloads to a GPU")
def test_a_gpu_worker_refuses_to_start_on_a_cpu_build(env: dict[str, str]) -> None:
    assert backend.describe() == "cpu"
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "ferry", "worker", "--gpu", "0"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and time.monotonic() - started < 30
    assert "--gpu 0: this llama-cpp-python is a CPU-only build" in out.stderr
    assert "make install CUDA=1" in out.stderr


def test_help_and_status_show_the_build(env: dict[str, str], base_url: str, worker: Proc) -> None:
    shown = subprocess.run([sys.executable, "-m", "ferry", "--help"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"llama.cpp build: {backend.describe()}" in shown
    workers = httpx.get(f"{base_url}/v1/status", timeout=30).json()["workers"]
    mine = [w for w in workers if w["pid"] == worker.p.pid]
    assert mine and mine[0]["backend"] == backend.describe()
