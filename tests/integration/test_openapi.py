"""The OpenAPI document, Swagger UI from local files, and schemathesis run against Ferry itself.

Schemathesis generates requests from `/openapi.json` for every operation and checks each answer:
no 5xx, a documented content type, and a body that matches its schema. It gets its own Redis
database, web process and worker (a 64-token context keeps generated completions short).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import SMOLLM, start_web, start_worker

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_url(env: dict[str, str], redis_url: str, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("fuzz")
    fenv = {**env, "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/5", "FERRY_CTX_LEN": "64"}
    redis.Redis.from_url(fenv["REDIS_URL"]).flushdb()
    worker = start_worker(fenv, SMOLLM, logs / "worker.log")
    web, url = start_web(fenv, logs / "web.log")
    yield url
    web.stop()
    worker.stop()


def test_generation_that_fills_the_context_ends_with_length(fuzz_url: str) -> None:
    """Found by schemathesis: both used to fail on the worker (500)."""
    with httpx.Client(base_url=fuzz_url, timeout=120) as http:
        empty = http.post("/v1/completions", json={"prompt": "", "max_tokens": 4})
        assert empty.status_code == 200, empty.text
        assert empty.json()["usage"]["completion_tokens"] == 4
        full = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Count."}], "ignore_eos": True})
        assert full.status_code == 200, full.text
        body = full.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["total_tokens"] == 64  # every place in the context used


def test_no_5xx_and_every_answer_matches_its_schema(fuzz_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    # /api/v1 repeats /v1. Left out: a download (it would fetch generated URLs and register
    # models) and a download's progress stream, which stays open while the model exists.
    schema = (schema.exclude(path_regex="^/api/v1/")
                    .exclude(method="POST", path="/v1/models")
                    .exclude(path_regex="/progress$"))
    failures, tried = [], 0
    for found in schema.get_all_operations():
        operation = found.ok()
        tried += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def run(case: Any) -> None:
            case.call_and_validate(checks=CHECKS, timeout=60)

        try:
            run()
        except BaseException as e:  # schemathesis raises a group: try every operation, show all
            if isinstance(e, KeyboardInterrupt):
                raise
            failures.append(f"{operation.label}: {str(e)[:1500]}")
    assert tried > 40
    assert not failures, "\n\n".join(failures)


def test_document_and_swagger_ui_are_served_locally(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    assert doc["openapi"] == "3.1.0"
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "/api/v1/threads/{thread_id}/messages" in doc["paths"]
    for path in ("/v1/embeddings", "/v1/responses", "/v1/messages"):
        assert doc["paths"][path]["post"]["responses"]["200"]["content"], path
    assert doc["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"][
        "schema"] == {"$ref": "#/components/schemas/EmbeddingRequest"}
    assert "owner" not in doc["components"]["schemas"]["Thread"]["properties"]

    page = http.get("/api/swagger/index.html")
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui-standalone-preset.js"):
        asset = http.get(f"/api/swagger/{name}")
        assert asset.status_code == 200 and len(asset.content) > 1000
    assert http.get("/api/swagger/../pyproject.toml").status_code == 404
    assert http.get("/api/swagger/", follow_redirects=True).url.path == "/api/swagger/index.html"
