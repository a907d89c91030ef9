"""Models started, stopped, evicted, auto-started and unloaded when idle, through the HTTP API.

The tests here get their own Redis database, web process and workers, so placement sees only the
workers they start. Worker A holds one model at a time (FERRY_MAX_LOADED_MODELS=1).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from shared import keys
from shared.registry.models import ModelRecord
from tests.helpers import MINILM, SMOLLM, Proc, error_of, smollm_path, start_web, start_worker

GEMMA = "gemma3-270m-it"


@pytest.fixture(scope="module")
def fleet_env(env: dict[str, str], redis_url: str) -> dict[str, str]:
    return {**env, "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/3", "FERRY_AUTO_START": "1"}


@pytest.fixture(scope="module")
def fleet(fleet_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("fleet")
    redis.Redis.from_url(fleet_env["REDIS_URL"]).flushdb()
    worker = start_worker({**fleet_env, "FERRY_MAX_LOADED_MODELS": "1"}, SMOLLM, logs / "a.log")
    web, url = start_web(fleet_env, logs / "web.log")
    fleet: dict[str, Any] = {"http": None, "worker": worker, "env": fleet_env, "logs": logs}
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            fleet["http"] = http
            yield fleet
    finally:
        web.stop()
        worker.stop()
        fleet["worker"].stop()  # a test may have put a fresh worker in its place


def workers(http: httpx.Client) -> list[dict[str, Any]]:
    return http.get("/v1/status").json()["workers"]


def state(http: httpx.Client, model: str) -> str:
    return http.get(f"/v1/models/{model}").json()["state"]


def chat(http: httpx.Client, model: str) -> httpx.Response:
    return http.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})


def wait_for(check: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_start_evicts_the_idle_model_and_auto_start_brings_it_back(fleet: dict[str, Any]) -> None:
    http = fleet["http"]
    assert state(http, SMOLLM) == "running"
    # Gemma is bundled but not yet registered: starting it registers it, and the worker, full at
    # one model, unloads SmolLM2 (idle) to make room.
    r = http.put(f"/v1/models/{GEMMA}/start")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == GEMMA and r.json()["state"] == "running"
    assert state(http, GEMMA) == "running" and state(http, SMOLLM) == "downloaded"
    assert [m["id"] for m in workers(http)[0]["models"]] == [GEMMA]
    assert http.put(f"/v1/models/{GEMMA}/start").json()["state"] == "running"  # idempotent

    # A completion for the model no worker holds loads it (evicting Gemma) and is served.
    r = chat(http, SMOLLM)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert [m["id"] for m in workers(http)[0]["models"]] == [SMOLLM]
    assert state(http, GEMMA) == "downloaded"


def test_an_embeddings_request_auto_starts_the_bundled_embedding_model(
        fleet: dict[str, Any]) -> None:
    """The bundled embedding model, never registered here, is converted (or found converted),
    loaded in place of the idle chat model, and answers; the chat model comes back the same way."""
    http = fleet["http"]
    assert chat(http, SMOLLM).status_code == 200
    r = http.post("/v1/embeddings", json={"model": MINILM, "input": "auto-started"})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][0]["embedding"]) == 384
    assert [m["id"] for m in workers(http)[0]["models"]] == [MINILM]
    record = http.get(f"/v1/models/{MINILM}").json()
    assert record["state"] == "running" and record["metadata"]["pooling_type"] == 1
    assert chat(http, SMOLLM).status_code == 200
    assert [m["id"] for m in workers(http)[0]["models"]] == [SMOLLM]


def test_stop_then_start(fleet: dict[str, Any]) -> None:
    http = fleet["http"]
    http.put(f"/v1/models/{SMOLLM}/start")
    assert http.put(f"/v1/models/{SMOLLM}/stop").json() == {
        "id": SMOLLM, "object": "model", "state": "stopped"}
    assert state(http, SMOLLM) == "stopped"
    assert workers(http)[0]["models"] == []
    assert http.put(f"/v1/models/{SMOLLM}/start").json()["state"] == "running"
    assert state(http, SMOLLM) == "running"
    assert chat(http, SMOLLM).status_code == 200


def test_unknown_and_too_large_models(fleet: dict[str, Any]) -> None:
    http = fleet["http"]
    for verb in ("start", "stop"):
        assert error_of(http.put(f"/v1/models/no-such-model/{verb}"), 404)["code"] == \
            "model_not_found"
    # A model whose header claims a petabyte of weights fits on no worker.
    huge = ModelRecord(id="huge", created=0, path=str(smollm_path()),
                       metadata={"size": 2**50})
    redis.Redis.from_url(fleet["env"]["REDIS_URL"]).hset(
        keys.MODELS, huge.id, huge.model_dump_json())
    err = error_of(http.put("/v1/models/huge/start"), 507)
    assert err["code"] == "model_too_large" and "MiB" in err["message"]
    err = error_of(chat(http, "huge"), 507)  # auto-start says the same
    assert http.delete("/v1/models/huge").json()["deleted"] is True
    assert smollm_path().exists()  # not Ferry's file: never removed


def test_killed_worker_leaves_and_an_idle_model_unloads(fleet: dict[str, Any], tmp_path: Path
                                                        ) -> None:
    http, env = fleet["http"], fleet["env"]
    http.put(f"/v1/models/{SMOLLM}/start")
    fleet["worker"].kill()
    # Dropped from the registry within a few heartbeats; its model no longer counts as loaded.
    wait_for(lambda: workers(http) == [] and state(http, SMOLLM) != "running")
    assert error_of(http.put(f"/v1/models/{SMOLLM}/start"), 503)["code"] == "no_worker"

    # A fresh, empty worker that unloads a model idle for a second.
    fresh: Proc = start_worker({**env, "FERRY_KEEP_ALIVE_S": "1"}, None, tmp_path / "b.log")
    fleet["worker"] = fresh
    assert workers(http)[0]["models"] == []
    r = http.put(f"/v1/models/{SMOLLM}/start")
    assert r.status_code == 200 and r.json()["worker"]["id"] == workers(http)[0]["id"]
    assert chat(http, SMOLLM).status_code == 200
    wait_for(lambda: state(http, SMOLLM) == "downloaded")
    assert workers(http)[0]["models"] == []
