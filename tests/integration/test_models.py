"""Model downloads over real HTTP, S3 (moto's server) and file://, and the registry they fill."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from ferry.redis_server import free_port
from tests.fileserver import FileServer
from tests.helpers import ROOT, Proc, error_of, moto_s3, smollm_path, sse_events, start_worker


@pytest.fixture
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


def wait_state(http: httpx.Client, model_id: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        r = http.get(f"/v1/models/{model_id}")
        if r.status_code == 404:
            return {"state": "gone"}
        body = r.json()
        if body["state"] != "downloading":
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def test_http_download_resumes_verifies_and_is_served(
    http: httpx.Client, files: FileServer, env: dict[str, str], tmp_path: Path
) -> None:
    url = files.add("SmolLM2-copy.gguf", smollm_path(), publish_sha256=True)
    files.drop_after = 30 * 1024 * 1024  # the first response stops a third of the way in
    r = http.post("/v1/models", json={"source_url": url, "id": "smol-http", "name": "Smol"})
    assert r.status_code == 200
    assert r.json()["message"] == "Starting download smol-http"
    assert error_of(http.post("/v1/models", json={"source_url": url, "id": "smol-http"}),
                    409)["code"] == "conflict"
    model = wait_state(http, "smol-http")
    assert model["state"] == "downloaded", model
    assert files.ranges_seen and files.ranges_seen[0].startswith("bytes=")  # it resumed
    assert model["source_url"] == url and model["name"] == "Smol" and model["format"] == "gguf"
    assert model["metadata"]["architecture"] == "llama"
    assert model["metadata"]["quantization"] == "Q4_1"
    assert model["metadata"]["size"] == smollm_path().stat().st_size
    assert model["settings"]["ctx_len"] == 8192 and "prompt_template" in model["settings"]
    assert model["download"]["state"] == "downloaded"
    stored = Path(env["FERRY_DATA_DIR"]) / "models" / "smol-http" / "SmolLM2-copy.gguf"
    digest = hashlib.sha256(stored.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(smollm_path().read_bytes()).hexdigest()
    assert "smol-http" in [m["id"] for m in http.get("/v1/models").json()["data"]]

    worker = start_worker(env, "smol-http", tmp_path / "worker.log")
    try:
        assert http.get("/v1/models/smol-http").json()["state"] == "running"
        done = http.post("/v1/completions", json={"model": "smol-http", "prompt": "Hi",
                                                  "max_tokens": 2})
        assert done.status_code == 200, done.text
        # Deleting a running model stops it on its worker, then removes it and its files.
        assert http.delete("/v1/models/smol-http").json() == {
            "id": "smol-http", "object": "model", "deleted": True}
        assert not stored.parent.exists()
        error_of(http.get("/v1/models/smol-http"), 404)
        worker_state = [w for w in http.get("/v1/status").json()["workers"]
                        if w["pid"] == worker.p.pid]
        assert worker_state and worker_state[0]["models"] == []  # the worker lives on, empty
    finally:
        worker.stop()


def test_bad_checksum_and_non_gguf_leave_no_file(
    http: httpx.Client, files: FileServer, env: dict[str, str], tmp_path: Path
) -> None:
    models_dir = Path(env["FERRY_DATA_DIR"]) / "models"
    url = files.add("smol.gguf", smollm_path())
    http.post("/v1/models", json={"source_url": url, "id": "smol-bad-sum", "sha256": "0" * 64})
    failed = wait_state(http, "smol-bad-sum")
    assert failed["state"] == "error" and "sha256" in failed["error"]
    assert not (models_dir / "smol-bad-sum").exists()

    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n" * 100)
    http.post("/v1/models", json={"source_url": files.add("notes.gguf", text), "id": "notes"})
    failed = wait_state(http, "notes")
    assert failed["state"] == "error" and "not a GGUF" in failed["error"]
    assert not (models_dir / "notes").exists()
    # A failed download can be started again by id, or deleted.
    files.files["notes.gguf"] = smollm_path()
    assert http.get("/v1/models/download/notes").status_code == 200
    assert wait_state(http, "notes")["state"] == "downloaded"
    assert http.delete("/v1/models/notes").json()["deleted"] is True


def test_cancel_a_running_download(http: httpx.Client, files: FileServer,
                                   env: dict[str, str]) -> None:
    files.delay_s = 0.02  # ~3 MB/s: the 98 MB file takes long enough to cancel
    http.post("/v1/models", json={"source_url": files.add("slow.gguf", smollm_path()),
                                  "id": "slow"})
    deadline = time.monotonic() + 30
    while http.get("/v1/models/slow").json().get("download", {}).get("bytes_done", 0) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert http.delete("/v1/models/slow").json()["deleted"] is True
    assert wait_state(http, "slow")["state"] == "gone"
    assert not (Path(env["FERRY_DATA_DIR"]) / "models" / "slow").exists()


def test_progress_stream_and_file_source(http: httpx.Client, base_url: str) -> None:
    http.post("/v1/models", json={"source_url": smollm_path().as_uri(), "id": "smol-file"})
    with httpx.stream("GET", f"{base_url}/v1/models/smol-file/progress", timeout=60) as r:
        events = [orjson.loads(d) for _, d in sse_events(r.iter_lines()) if d != "[DONE]"]
    assert events[-1]["state"] == "downloaded"
    assert all(e["object"] == "model.download" for e in events)
    assert http.get("/v1/models/smol-file").json()["metadata"]["architecture"] == "llama"
    http.delete("/v1/models/smol-file")


@pytest.mark.parametrize(
    ("body", "param"),
    [({"source_url": "ftp://example.com/m.gguf"}, "source_url"),
     ({"source_url": "http:///m.gguf"}, "source_url"),
     ({"source_url": "file:///m.gguf", "id": "../etc"}, "id"),
     ({"source_url": "file:///m.gguf", "id": "/abs"}, "id"),
     ({"source_url": "file:///m.gguf", "sha256": "xyz"}, "sha256"),
     ({"id": "x"}, "source_url")],
)
def test_bad_download_requests(http: httpx.Client, body: dict[str, str], param: str) -> None:
    assert error_of(http.post("/v1/models", json=body), 400)["param"] == param


def test_unknown_model_lifecycle_ids(http: httpx.Client) -> None:
    error_of(http.delete("/v1/models/no-such-model"), 404)
    error_of(http.get("/v1/models/download/no-such-model"), 404)


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[str]:
    """moto's S3-compatible server on loopback, with the GGUF in a bucket."""
    with moto_s3() as (endpoint, client):
        client.create_bucket(Bucket="models")
        client.upload_file(str(smollm_path()), "models", "smol/SmolLM2.gguf")
        yield endpoint


def test_s3_download(env: dict[str, str], s3: str, tmp_path: Path) -> None:
    s3_env = env | {"FERRY_S3_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test"}
    port = free_port()
    web = Proc(["web", "--port", str(port)], s3_env, tmp_path / "web.log")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    http.get("/v1/models")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            r = http.post("/v1/models", json={"source_url": "s3://models/smol/SmolLM2.gguf",
                                              "id": "smol-s3"})
            assert r.status_code == 200, r.text
            model = wait_state(http, "smol-s3")
            assert model["state"] == "downloaded", model
            assert model["metadata"]["size"] == smollm_path().stat().st_size
            missing = http.post("/v1/models", json={"source_url": "s3://models/nope.gguf",
                                                    "id": "smol-s3-missing"})
            assert missing.status_code == 200
            assert wait_state(http, "smol-s3-missing")["state"] == "error"
            http.delete("/v1/models/smol-s3")
            http.delete("/v1/models/smol-s3-missing")
    finally:
        web.stop()




def test_models_command_line(env: dict[str, str], files: FileServer, tmp_path: Path) -> None:
    def ferry(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ferry", "models", *args], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    local = tmp_path / "My-Model.gguf"
    local.symlink_to(smollm_path())
    imported = ferry("import", str(local))
    assert imported.returncode == 0, imported.stderr
    assert "imported my-model (llama, Q4_1)" in imported.stdout
    pulled = ferry("pull", files.add("pulled.gguf", smollm_path()), "--id", "cli-pulled")
    assert pulled.returncode == 0, pulled.stderr
    assert "100.0%" in pulled.stderr  # the progress bar reached the end
    listing = ferry("list").stdout
    assert "my-model" in listing and "cli-pulled" in listing
    assert ferry("rm", "cli-pulled").returncode == 0
    assert ferry("rm", "my-model").returncode == 0
    assert local.exists()  # the user's own file is never removed
    after = ferry("list").stdout
    assert "my-model" not in after and "cli-pulled" not in after
    assert ferry("rm", "my-model").returncode == 1


def test_two_models_on_two_workers_at_once(base_url: str, env: dict[str, str],
                                           tmp_path: Path) -> None:
    gemma = start_worker(env, "gemma3-270m-it", tmp_path / "gemma.log", timeout_s=120)
    spans: dict[str, tuple[float, float, str]] = {}

    def chat(model: str) -> None:
        # SmolLM2 is the faster: a longer answer keeps it going while Gemma starts.
        body = {"model": model, "messages": [{"role": "user", "content": "Count to twenty."}],
                "max_tokens": 48 if model.startswith("smollm2") else 16, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                          timeout=60) as r:
            assert r.status_code == 200
            stamps, text = [], ""
            for _, data in sse_events(r.iter_lines()):
                if data != "[DONE]":
                    stamps.append(time.monotonic())
                    text += orjson.loads(data)["choices"][0]["delta"].get("content") or ""
        spans[model] = (stamps[0], stamps[-1], text)

    try:
        threads = [threading.Thread(target=chat, args=(m,))
                   for m in ("smollm2-135m-instruct", "gemma3-270m-it")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        gemma.stop()
    (a0, a1, a_text), (b0, b1, b_text) = spans.values()
    assert a_text and b_text and a_text != b_text
    assert a0 < b1 and b0 < a1  # both were generating at the same time, each on its worker
