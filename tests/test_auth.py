"""Server mode (FERRY_AUTH=on): tokens, API keys, isolation between users, rate limits.

Its own Redis database, one worker and two web processes sharing it, so the limits are proved to
hold across processes. Users and keys are made with the `ferry users` / `ferry keys` commands.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
import redis

from tests.conftest import ROOT, SMOLLM, start_web, start_worker
from tests.test_bad_input import error_of

SECRET = "test-secret-" + "x" * 40


@pytest.fixture(scope="module")
def server(env: dict[str, str], redis_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("auth")
    senv = {**env, "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/4", "FERRY_AUTH": "on",
            "FERRY_JWT_SECRET": SECRET, "FERRY_RATE_LIMIT_INFERENCE_PER_MINUTE": "3",
            "FERRY_RATE_LIMIT_USER_PER_HOUR": "40", "FERRY_RATE_LIMIT_IP_PER_HOUR": "1000",
            "FERRY_CORS_ORIGINS": "https://app.example"}
    redis.Redis.from_url(senv["REDIS_URL"]).flushdb()
    worker = start_worker(senv, SMOLLM, logs / "worker.log")
    (web_a, url_a), (web_b, url_b) = start_web(senv, logs / "a.log"), start_web(senv, logs / "b.log")
    yield {"env": senv, "a": url_a, "b": url_b, "logs": [web_a.log, web_b.log]}
    for p in (web_a, web_b, worker):
        p.stop()


def ferry(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ferry", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def login(server: dict[str, Any], name: str, admin: bool = False) -> dict[str, str]:
    """Create the user and return its access and refresh tokens."""
    made = ferry(server["env"], "users", "create", name, *(["--admin"] if admin else []))
    assert made.returncode == 0, made.stderr
    out = ferry(server["env"], "users", "token", name)
    assert out.returncode == 0, out.stderr
    return dict(line.split("=", 1) for line in out.stdout.split())


def client(url: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


def test_bad_tokens_are_401_with_www_authenticate(server: dict[str, Any]) -> None:
    now = int(time.time())
    good = {"sub": "user_x", "iss": "ferry", "aud": "ferry-api", "iat": now, "exp": now + 60}
    tokens = {
        "missing": None,
        "garbage": "not-a-jwt",
        "wrongly signed": jwt.encode(good, "another-secret-" + "y" * 40, algorithm="HS256"),
        "expired": jwt.encode({**good, "exp": now - 10}, SECRET, algorithm="HS256"),
        "other audience": jwt.encode({**good, "aud": "someone-else"}, SECRET, algorithm="HS256"),
        "unsigned": jwt.encode(good, None, algorithm="none"),
        "unknown key": "sk-ferry-doesnotexist",
    }
    for what, token in tokens.items():
        with client(server["a"], token) as http:
            r = http.get("/v1/threads")
            err = error_of(r, 401)
            assert r.headers["WWW-Authenticate"].startswith("Bearer"), what
            assert err["type"] == "invalid_request_error", what
            if token:
                assert token not in r.text, what
    r = httpx.get(f"{server['a']}/v1/threads", headers={"Authorization": "Basic abc"})
    error_of(r, 401)
    assert httpx.get(f"{server['a']}/health").status_code == 200  # public


def test_profile_keys_read_write_revoke_and_refresh(server: dict[str, Any]) -> None:
    tokens = login(server, "alice")
    with client(server["a"], tokens["access_token"]) as http:
        me = http.get("/api/v1/user/profile").json()
        assert me["name"] == "alice" and me["object"] == "user" and me["admin"] is False
        made = {p: http.post("/api/v1/user/api-keys",
                             json={"name": f"{p} key", "permissions": [p]}).json()
                for p in ("read", "write")}
        listed = http.get("/api/v1/user/api-keys")
        assert sorted(k["name"] for k in listed.json()["data"]) == ["read key", "write key"]
        assert "key" not in listed.json()["data"][0]
        assert all(m["key"] not in listed.text for m in made.values())
        error_of(http.post("/api/v1/user/api-keys", json={"name": "x", "permissions": ["root"]}),
                 400)

    with client(server["b"], made["read"]["key"]) as reader:
        assert reader.get("/v1/threads").status_code == 200
        err = error_of(reader.post("/v1/threads", json={}), 403)
        assert err["code"] == "insufficient_permissions"
        error_of(reader.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}), 403)
    with client(server["b"], made["write"]["key"]) as writer:
        assert writer.post("/v1/threads", json={"title": "t"}).status_code == 200
        with client(server["a"], tokens["access_token"]) as http:
            gone = http.delete(f"/api/v1/user/api-keys/{made['write']['id']}")
            assert gone.json()["deleted"] is True
        error_of(writer.get("/v1/threads"), 401)  # revoked: refused on the very next request

    # Refresh rotates: the new pair works, the spent refresh token does not.
    r = httpx.post(f"{server['b']}/api/v1/auth/refresh",
                   json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 200, r.text
    fresh = r.json()
    assert fresh["token_type"] == "Bearer" and fresh["refresh_token"] != tokens["refresh_token"]
    with client(server["a"], fresh["access_token"]) as http:
        assert http.get("/api/v1/user/profile").json()["name"] == "alice"
    error_of(httpx.post(f"{server['a']}/api/v1/auth/refresh",
                        json={"refresh_token": tokens["refresh_token"]}), 401)

    for log in server["logs"]:
        text = log.read_text()
        assert SECRET not in text and made["read"]["key"] not in text
        assert tokens["refresh_token"] not in text and tokens["access_token"] not in text


def test_users_see_only_their_own_objects(server: dict[str, Any]) -> None:
    owner, other = login(server, "olga"), login(server, "oscar")
    with client(server["a"], owner["access_token"]) as mine:
        asst = mine.post("/v1/assistants", json={"model": SMOLLM, "name": "a"}).json()
        thread = mine.post("/v1/threads", json={"title": "private"}).json()
        msg = mine.post(f"/v1/threads/{thread['id']}/messages",
                        json={"role": "user", "content": "secret"}).json()
        conv = mine.post("/api/v1/conversations", json={"title": "c"}).json()
        run = mine.post(f"/v1/threads/{thread['id']}/runs",
                        json={"assistant_id": asst["id"], "max_tokens": 2}).json()
        assert run["id"].startswith("run")
    with client(server["b"], other["access_token"]) as theirs:
        for path in (f"/v1/assistants/{asst['id']}", f"/v1/threads/{thread['id']}",
                     f"/v1/threads/{thread['id']}/messages",
                     f"/v1/threads/{thread['id']}/messages/{msg['id']}",
                     f"/v1/threads/{thread['id']}/runs/{run['id']}",
                     f"/api/v1/conversations/{conv['id']}"):
            error_of(theirs.get(path), 404)
        error_of(theirs.delete(f"/v1/threads/{thread['id']}"), 404)
        error_of(theirs.post(f"/v1/threads/{thread['id']}/messages",
                             json={"role": "user", "content": "x"}), 404)
        for path in ("/v1/assistants", "/v1/threads", "/api/v1/conversations"):
            assert theirs.get(path).json()["data"] == [], path
        # Models are shared to read, but only an admin changes them.
        assert SMOLLM in [m["id"] for m in theirs.get("/v1/models").json()["data"]]
        error_of(theirs.put(f"/v1/models/{SMOLLM}/stop"), 403)
        error_of(theirs.delete(f"/v1/models/{SMOLLM}"), 403)
    admin = login(server, "root", admin=True)
    with client(server["a"], admin["access_token"]) as http:
        assert http.put(f"/v1/models/{SMOLLM}/start").json()["state"] == "running"


def test_rate_limits_hold_across_web_processes(server: dict[str, Any]) -> None:
    tokens = login(server, "rita")
    a, b = client(server["a"], tokens["access_token"]), client(server["b"], tokens["access_token"])
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    with a, b:
        codes = [(a if i % 2 else b).post("/v1/chat/completions", json=body) for i in range(4)]
        assert [r.status_code for r in codes] == [200, 200, 200, 429]
        assert int(codes[3].headers["Retry-After"]) >= 1
        assert error_of(codes[3], 429)["code"] == "rate_limit_exceeded"
        # The hourly window, counted once across both processes: 4 so far, 40 allowed.
        remaining = []
        for i in range(36):
            r = (a if i % 2 else b).get("/v1/threads")
            assert r.status_code == 200 and r.headers["X-RateLimit-Limit"] == "40"
            remaining.append(int(r.headers["X-RateLimit-Remaining"]))
        assert remaining == list(range(35, -1, -1))
        over = a.get("/v1/threads")
        error_of(over, 429)
        assert over.headers["X-RateLimit-Remaining"] == "0"
        assert int(over.headers["X-RateLimit-Reset"]) > time.time()
    # Unauthenticated requests count against the IP, in both processes alike.
    first = httpx.get(f"{server['a']}/health").headers["X-RateLimit-Remaining"]
    second = httpx.get(f"{server['b']}/health").headers["X-RateLimit-Remaining"]
    assert int(second) == int(first) - 1


def test_metrics_are_the_same_from_every_web_process(server: dict[str, Any]) -> None:
    tokens = login(server, "mia")
    with client(server["a"], tokens["access_token"]) as http:
        done = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "ignore_eos": True})
        assert done.status_code == 200, done.text
    scrapes = [httpx.get(f"{url}/metrics").text for url in (server["a"], server["b"])]
    jobs = [[line for line in text.splitlines() if line.startswith(("ferry_jobs_total",
             "ferry_tokens_generated", "ferry_time_to_first_token_seconds_count",
             "ferry_workers_alive"))] for text in scrapes]
    assert jobs[0] == jobs[1]
    text = scrapes[0]
    assert f'ferry_jobs_total{{model="{SMOLLM}",outcome="completed"}}' in text
    assert "ferry_workers_alive 1" in text and f'ferry_queue_depth{{model="{SMOLLM}"}} 0' in text
    assert f'ferry_decode_tokens_per_second_bucket{{model="{SMOLLM}",le="+Inf"}}' in text
    assert ('ferry_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}'
            in text)
    assert 'status="401"' in text  # the refused requests of the tests before


def test_cors_allows_only_configured_origins(server: dict[str, Any]) -> None:
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    ok = httpx.options(f"{server['a']}/v1/chat/completions",
                       headers={"Origin": "https://app.example", **preflight})
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "authorization" in ok.headers["Access-Control-Allow-Headers"]
    other = httpx.options(f"{server['a']}/v1/chat/completions",
                          headers={"Origin": "https://evil.example", **preflight})
    assert "Access-Control-Allow-Origin" not in other.headers
    r = httpx.get(f"{server['b']}/health", headers={"Origin": "https://app.example"})
    assert "X-RateLimit-Remaining" in r.headers["Access-Control-Expose-Headers"]


def test_no_open_bind_without_auth(env: dict[str, str]) -> None:
    open_bind = ferry({**env, "FERRY_AUTH": "off"}, "web", "--host", "0.0.0.0", "--port", "9")
    assert open_bind.returncode != 0 and "FERRY_ALLOW_INSECURE" in open_bind.stderr
    no_secret = ferry({**env, "FERRY_AUTH": "on"}, "web", "--port", "9")
    assert no_secret.returncode != 0 and "FERRY_JWT_SECRET" in no_secret.stderr
