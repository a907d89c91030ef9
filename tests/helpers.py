"""What tests share besides fixtures: the real processes they start (a Ferry worker or web
process, moto's S3 server), the bundled model's file, and readers for SSE and error bodies."""

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

from ferry.redis_server import free_port
from shared import keys
from shared.redis import client
from shared.registry import models

SMOLLM = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"  # the bundled embedding model
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def smollm_path() -> Path:
    return Path(models.resolve(SMOLLM, Path("/nonexistent")).path)


@contextmanager
def smollm_in_process() -> Iterator[Any]:
    """SmolLM2 loaded in this process (a `LlamaModel`), for tests of the engine without a worker."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    llama_cpp.llama_backend_init()
    model = LlamaModel(path_model=str(smollm_path()),
                       params=llama_cpp.llama_model_default_params(), verbose=False)
    try:
        yield model
    finally:
        model.close()


def engine_context(model: Any, n_ctx: int, n_batch: int, sequences: int) -> Any:
    """A `LlamaContext` on `model` as the engine makes one: `sequences` sharing one KV cache."""
    import llama_cpp
    from llama_cpp._internals import LlamaContext

    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
    params.n_seq_max, params.kv_unified = sequences, True
    return LlamaContext(model=model, params=params, verbose=False)


def own_model(tmp_path: Path, name: str) -> Path:
    """SmolLM2's file under a name of the test's own: only that test's worker serves it, so the
    test may kill or stop that worker without harm to the others."""
    link = tmp_path / f"{name}.gguf"
    link.symlink_to(smollm_path())
    return link


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
            beats = [r.get(k) for k in r.scan_iter(keys.worker("*"))]
            mine = [w for b in beats if b and (w := orjson.loads(b))["pid"] == proc.p.pid]
            if mine and (mine[0]["models"] or not model):
                return proc
            time.sleep(0.1)
    finally:
        r.close()
    proc.stop()
    raise TimeoutError(f"worker for {model} did not come up: {log.read_text()[-2000:]}")


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


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str | None, str]]:
    """(id, data) for each event of an SSE body, comments skipped."""
    event_id = None
    for line in lines:
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            yield event_id, line[6:]
            event_id = None


def stream_text(datas: list[str]) -> str:
    out = ""
    for d in datas:
        if d != "[DONE]":
            choices = orjson.loads(d)["choices"]
            out += "".join(c["delta"].get("content") or "" for c in choices)
    return out


def error_of(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def allowed_tokens(sampler: Any, n_vocab: int) -> set[int]:
    """The tokens a grammar sampler lets through now (llama.cpp is imported here: unit tests of
    other parts never load it)."""
    import ctypes

    import llama_cpp

    data = (llama_cpp.llama_token_data * n_vocab)(
        *[llama_cpp.llama_token_data(t, 0.0, 0.0) for t in range(n_vocab)])
    arr = llama_cpp.llama_token_data_array(data, n_vocab, -1, False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
    return {data[i].id for i in range(n_vocab) if data[i].logit != float("-inf")}
