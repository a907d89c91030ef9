"""Server mode (FERRY_AUTH=on): tokens, API keys, isolation between users, rate limits.

Its own Redis database, one worker and two web processes sharing it, so the limits are proved to
hold across processes. Users and keys are made with the `ferry users` / `ferry keys` commands.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from shared import keys
from tests.helpers import MINILM, ROOT, SMOLLM, error_of, start_web, start_worker
from tests.oidc_provider import OIDCProvider

SECRET = "test-secret-" + "x" * 40
OIDC_CLIENT, OIDC_SECRET = "ferry-test-client", "oidc-client-secret-" + "z" * 20


@pytest.fixture(scope="module")
def server(env: dict[str, str], redis_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("auth")
    provider = OIDCProvider(OIDC_CLIENT, OIDC_SECRET)
    senv = {**env, "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/4", "FERRY_AUTH": "on",
            "FERRY_JWT_SECRET": SECRET, "FERRY_RATE_LIMIT_INFERENCE_PER_MINUTE": "3",
            "FERRY_RATE_LIMIT_USER_PER_HOUR": "40", "FERRY_RATE_LIMIT_IP_PER_HOUR": "1000",
            "FERRY_CORS_ORIGINS": "https://app.example", "FERRY_OIDC_ISSUER": provider.url,
            "FERRY_OIDC_CLIENT_ID": OIDC_CLIENT, "FERRY_OIDC_CLIENT_SECRET": OIDC_SECRET}
    redis.Redis.from_url(senv["REDIS_URL"]).flushdb()
    worker = start_worker(senv, SMOLLM, logs / "worker.log", args=("--model", MINILM))
    (web_a, url_a), (web_b, url_b) = start_web(senv, logs / "a.log"), start_web(senv, logs / "b.log")
    yield {"env": senv, "a": url_a, "b": url_b, "logs": [web_a.log, web_b.log],
           "oidc": provider, "worker_log": worker.log}
    for p in (web_a, web_b, worker):
        p.stop()
    provider.close()


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


def begin_login(url: str) -> httpx.Response:
    """`/auth/google`, then the provider's approval: the redirect back to Ferry's callback."""
    start = httpx.get(f"{url}/auth/google")
    assert start.status_code == 302
    to_provider = httpx.URL(start.headers["Location"])
    assert to_provider.params["code_challenge_method"] == "S256"
    assert to_provider.params["state"] and to_provider.params["nonce"]
    back = httpx.get(to_provider)
    assert back.status_code == 302
    return back


def test_oidc_login_with_pkce_and_state(server: dict[str, Any]) -> None:
    back = httpx.URL(begin_login(server["a"]).headers["Location"])
    assert back.path == "/auth/google/callback"
    # The callback may land on another web process: the login is kept in Redis.
    done = httpx.get(f"{server['b']}{back.path}", params=back.params)
    assert done.status_code == 200, done.text
    tokens = done.json()
    assert tokens["token_type"] == "Bearer" and tokens["refresh_token"]
    assert tokens["user"]["email"] == "ada@example.com"
    with client(server["a"], tokens["access_token"]) as ada:
        assert ada.get("/api/v1/user/profile").json()["id"] == tokens["user"]["id"]

    # The same state again: refused, whatever the code.
    again = httpx.get(f"{server['a']}{back.path}", params=back.params)
    assert error_of(again, 400)["code"] == "invalid_state"
    # A forged state.
    forged = httpx.get(f"{server['a']}/auth/google/callback",
                       params={"code": back.params["code"], "state": "forged-state"})
    assert error_of(forged, 400)["code"] == "invalid_state"
    # The spent code under a fresh, valid state: the provider refuses it.
    fresh = httpx.URL(begin_login(server["a"]).headers["Location"])
    reused = httpx.get(f"{server['a']}{fresh.path}",
                       params={"code": back.params["code"], "state": fresh.params["state"]})
    assert error_of(reused, 400)["code"] == "invalid_grant"
    # That state is spent too, though its code was never used.
    assert httpx.get(f"{server['a']}{fresh.path}", params=fresh.params).status_code == 400

    # The same person logging in again is the same user; another person is another user.
    same = httpx.URL(begin_login(server["a"]).headers["Location"])
    assert httpx.get(f"{server['a']}{same.path}", params=same.params).json()["user"]["id"] == \
        tokens["user"]["id"]
    server["oidc"].user = {"sub": "1002", "email": "grace@example.com", "name": "Grace"}
    other = httpx.URL(begin_login(server["a"]).headers["Location"])
    grace = httpx.get(f"{server['a']}{other.path}", params=other.params).json()["user"]
    assert grace["id"] != tokens["user"]["id"] and grace["email"] == "grace@example.com"

    denied = httpx.get(f"{server['a']}/auth/google/callback", params={"error": "access_denied"})
    assert error_of(denied, 400)["code"] == "login_refused"
    status = httpx.get(f"{server['a']}/api/v1/status",
                       headers={"Authorization": f"Bearer {tokens['access_token']}"}).json()
    assert status["external_apis"]["oidc"] == {"status": "healthy",
                                               "issuer": server["oidc"].url}
    for log in server["logs"]:
        text = log.read_text()
        assert OIDC_SECRET not in text and tokens["access_token"] not in text


def test_users_see_only_their_own_objects(server: dict[str, Any]) -> None:
    owner, other = login(server, "olga"), login(server, "oscar")
    with client(server["a"], owner["access_token"]) as mine:
        asst = mine.post("/v1/assistants", json={"model": SMOLLM, "name": "a"}).json()
        thread = mine.post("/v1/threads", json={"title": "private"}).json()
        msg = mine.post(f"/v1/threads/{thread['id']}/messages",
                        json={"role": "user", "content": "secret"}).json()
        conv = mine.post("/api/v1/conversations", json={"title": "c"}).json()
        run = mine.post(f"/v1/threads/{thread['id']}/runs",
                        json={"assistant_id": asst["id"], "max_completion_tokens": 2}).json()
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


def test_files_and_batches_belong_to_their_user(server: dict[str, Any]) -> None:
    owner, other = login(server, "fern"), login(server, "gus")
    line = orjson.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": 1}}) + b"\n"
    with client(server["a"], owner["access_token"]) as mine:
        made = mine.post("/v1/files", data={"purpose": "batch"},
                         files={"file": ("in.jsonl", line)}).json()
        batch = mine.post("/v1/batches", json={"input_file_id": made["id"], "completion_window":
                                               "24h", "endpoint": "/v1/chat/completions"}).json()
        assert batch["status"] == "validating"
        key = mine.post("/api/v1/user/api-keys", json={"name": "r", "permissions": ["read"]}).json()
    with client(server["b"], other["access_token"]) as theirs:
        for path in (f"/v1/files/{made['id']}", f"/v1/files/{made['id']}/content",
                     f"/v1/batches/{batch['id']}"):
            error_of(theirs.get(path), 404)
        error_of(theirs.post(f"/v1/batches/{batch['id']}/cancel"), 404)
        error_of(theirs.delete(f"/v1/files/{made['id']}"), 404)
        assert theirs.get("/v1/files").json()["data"] == []
        assert theirs.get("/v1/batches").json()["data"] == []
        refused = theirs.post("/v1/batches", json={"input_file_id": made["id"], "endpoint":
                                                   "/v1/chat/completions", "completion_window": "24h"})
        assert error_of(refused, 400)["param"] == "input_file_id"  # not theirs to read
    with client(server["b"], key["key"]) as reader:  # a read key lists and downloads, no more
        assert reader.get(f"/v1/files/{made['id']}/content").content == line
        assert [b["id"] for b in reader.get("/v1/batches").json()["data"]] == [batch["id"]]
        error_of(reader.post("/v1/files", data={"purpose": "batch"},
                             files={"file": ("in.jsonl", line)}), 403)
        error_of(reader.post(f"/v1/batches/{batch['id']}/cancel"), 403)


def test_embeddings_need_a_write_key_and_count_as_inference(server: dict[str, Any]) -> None:
    tokens = login(server, "emma")
    with client(server["a"], tokens["access_token"]) as http:
        made = {p: http.post("/api/v1/user/api-keys", json={"name": p, "permissions": [p]}).json()
                for p in ("read", "write")}
    body = {"model": MINILM, "input": "Hello"}
    error_of(httpx.post(f"{server['a']}/v1/embeddings", json=body), 401)
    with client(server["b"], made["read"]["key"]) as reader:
        assert error_of(reader.post("/v1/embeddings", json=body), 403)["code"] == \
            "insufficient_permissions"
    with client(server["b"], made["write"]["key"]) as writer:
        codes = [writer.post("/v1/embeddings", json=body) for _ in range(3)]
    # 3 inference calls a minute for the user, the read key's refused one among them
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert len(codes[0].json()["data"][0]["embedding"]) == 384


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
    first = httpx.get(f"{server['a']}/openapi.json").headers["X-RateLimit-Remaining"]
    second = httpx.get(f"{server['b']}/openapi.json").headers["X-RateLimit-Remaining"]
    assert int(second) == int(first) - 1
    # Probes and scrapes are not counted: a readiness probe must not use up the IP's hour.
    for path in ("/health", "/metrics"):
        assert "X-RateLimit-Remaining" not in httpx.get(f"{server['a']}{path}").headers
    third = httpx.get(f"{server['a']}/openapi.json").headers["X-RateLimit-Remaining"]
    assert int(third) == int(second) - 1


def test_metrics_are_the_same_from_every_web_process(server: dict[str, Any]) -> None:
    tokens = login(server, "mia")
    with client(server["a"], tokens["access_token"]) as http:
        done = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "ignore_eos": True})
        assert done.status_code == 200, done.text
    # The answer can reach the client just before arq takes the finished job off the queue.
    deadline = time.monotonic() + 30
    while f'ferry_queue_depth{{model="{SMOLLM}"}} 0' not in httpx.get(f"{server['a']}/metrics").text:
        assert time.monotonic() < deadline, _queue_report(server)
        time.sleep(0.05)
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


def _queue_report(server: dict[str, Any]) -> str:
    """What holds the queue: each job's arq keys, and the worker's log."""
    r = redis.Redis.from_url(server["env"]["REDIS_URL"])
    lines = []
    for job, score in r.zrange(keys.queue(SMOLLM), 0, -1, withscores=True):
        jid = job.decode()
        lines.append(f"{jid} score={score:.0f} now={time.time() * 1000:.0f} "
                     f"in_progress={r.exists('arq:in-progress:' + jid)} "
                     f"job={r.exists('arq:job:' + jid)} result={r.exists('arq:result:' + jid)}")
    r.close()
    return "\n".join(lines) + "\n" + server["worker_log"].read_text()[-3000:]


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


def test_key_pair_signs_tokens_and_refuses_algorithm_confusion(
        server: dict[str, Any], tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "jwt.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    kenv = {k: v for k, v in server["env"].items() if k != "FERRY_JWT_SECRET"}
    kenv["FERRY_JWT_PRIVATE_KEY_FILE"] = str(pem)
    assert ferry(kenv, "users", "create", "kp-user").returncode == 0
    tokens = dict(line.split("=", 1) for line in ferry(kenv, "users", "token", "kp-user").stdout.split())
    assert jwt.get_unverified_header(tokens["access_token"])["alg"] == "RS256"
    web, url = start_web(kenv, tmp_path / "web.log")
    try:
        with client(url, tokens["access_token"]) as http:
            assert http.get("/api/v1/user/profile").json()["name"] == "kp-user"
        claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        # HS256 keyed with the public key, the classic confusion attack; and the old secret.
        # (PyJWT will not sign that, so it is made by hand.)
        def b64(data: bytes) -> bytes:
            return base64.urlsafe_b64encode(data).rstrip(b"=")
        signed = b64(orjson.dumps({"alg": "HS256", "typ": "JWT"})) + b"." + b64(orjson.dumps(claims))
        confused = signed + b"." + b64(hmac.new(public, signed, hashlib.sha256).digest())
        forged = [confused.decode(), jwt.encode(claims, SECRET, algorithm="HS256")]
        for token in forged:
            with client(url, token) as http:
                error_of(http.get("/api/v1/user/profile"), 401)
    finally:
        web.stop()
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    refused = ferry({**kenv, "FERRY_JWT_PRIVATE_KEY_FILE": str(bad)}, "web", "--port", "9")
    assert refused.returncode != 0 and "FERRY_JWT_PRIVATE_KEY_FILE" in refused.stderr


def test_responses_belong_to_their_user(server: dict[str, Any]) -> None:
    owner, other = login(server, "rhea"), login(server, "rufus")
    with client(server["a"], owner["access_token"]) as mine:
        made = mine.post("/v1/responses", json={"model": SMOLLM, "input": "Hi",
                                                "max_output_tokens": 2})
        assert made.status_code == 200, made.text
        rid = made.json()["id"]
        key = mine.post("/api/v1/user/api-keys", json={"name": "r", "permissions": ["read"]}).json()
    with client(server["b"], other["access_token"]) as theirs:  # another web process, too
        for path in (f"/v1/responses/{rid}", f"/v1/responses/{rid}/input_items"):
            error_of(theirs.get(path), 404)
        error_of(theirs.delete(f"/v1/responses/{rid}"), 404)
        error_of(theirs.post(f"/v1/responses/{rid}/cancel"), 404)
        chained = theirs.post("/v1/responses", json={"model": SMOLLM, "input": "And?",
                                                     "previous_response_id": rid})
        assert error_of(chained, 400)["param"] == "previous_response_id"
    with client(server["b"], key["key"]) as reader:  # a read key reads, and creates nothing
        assert reader.get(f"/v1/responses/{rid}").json()["status"] in ("completed", "incomplete")
        error_of(reader.post("/v1/responses", json={"model": SMOLLM, "input": "Hi"}), 403)
        error_of(reader.delete(f"/v1/responses/{rid}"), 403)


def test_anthropic_clients_authenticate_with_x_api_key(server: dict[str, Any]) -> None:
    import anthropic

    user = login(server, "ada")
    with client(server["a"], user["access_token"]) as mine:
        key = mine.post("/api/v1/user/api-keys", json={"name": "w", "permissions": ["read",
                                                                                 "write"]}).json()
    sdk = anthropic.Anthropic(base_url=server["b"], api_key=key["key"], max_retries=0)
    said = sdk.messages.create(model=SMOLLM, max_tokens=2, messages=[{"role": "user",
                                                                      "content": "Hi"}])
    assert said.usage.output_tokens <= 2
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=server["b"], api_key="sk-ferry-wrong", max_retries=0
                            ).messages.create(model=SMOLLM, max_tokens=2,
                                              messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["type"] == "error"  # Anthropic's shape on its route
    assert e.value.body["error"]["type"] == "authentication_error"
