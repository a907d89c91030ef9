"""A small, real OpenID Connect provider on loopback, for the login tests.

It does what Google does for the authorization-code flow and checks what Google checks: the
client's id, secret and redirect URI, the PKCE verifier against the S256 challenge, and that a
code is redeemed once. `/authorize` approves at once as `user` (no login page). ID tokens are
RS256 JWTs signed with a key generated at start and published at `/jwks`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


class OIDCProvider:
    def __init__(self, client_id: str, client_secret: str) -> None:
        self.client_id, self.client_secret = client_id, client_secret
        self.user: dict[str, Any] = {"sub": "1001", "email": "ada@example.com",
                                     "email_verified": True, "name": "Ada"}
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = secrets.token_hex(4)
        self.codes: dict[str, dict[str, str]] = {}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def discovery(self) -> dict[str, Any]:
        return {"issuer": self.url, "authorization_endpoint": f"{self.url}/authorize",
                "token_endpoint": f"{self.url}/token", "jwks_uri": f"{self.url}/jwks",
                "response_types_supported": ["code"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic",
                                                          "client_secret_post"]}

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    def authorize(self, q: dict[str, str]) -> tuple[int, dict[str, str]]:
        """Approve at once: redirect back with a code bound to the request's PKCE and nonce."""
        if q.get("client_id") != self.client_id or q.get("response_type") != "code":
            return 400, {}
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            return 400, {}
        code = secrets.token_urlsafe(24)
        self.codes[code] = {k: q.get(k, "") for k in
                            ("redirect_uri", "code_challenge", "nonce", "client_id")}
        back = urlencode({"code": code, "state": q.get("state", "")})
        return 302, {"Location": f"{q['redirect_uri']}?{back}"}

    def token(self, form: dict[str, str], basic: str | None) -> tuple[int, dict[str, Any]]:
        client_id, secret = form.get("client_id"), form.get("client_secret")
        if basic:
            client_id, _, secret = base64.b64decode(basic).decode().partition(":")
        if client_id != self.client_id or secret != self.client_secret:
            return 401, {"error": "invalid_client"}
        code = form.get("code", "")
        grant = self.codes.pop(code, None)  # a code is good once
        if grant is None:
            return 400, {"error": "invalid_grant"}
        challenge = base64.urlsafe_b64encode(
            hashlib.sha256(form.get("code_verifier", "").encode()).digest()).rstrip(b"=").decode()
        if form.get("redirect_uri") != grant["redirect_uri"] or challenge != grant["code_challenge"]:
            return 400, {"error": "invalid_grant"}
        now = int(time.time())
        claims = {**self.user, "iss": self.url, "aud": self.client_id, "iat": now,
                  "exp": now + 300, "nonce": grant["nonce"]}
        id_token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})
        return 200, {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer",
                     "expires_in": 300, "id_token": id_token}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any] | None = None,
                      headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/.well-known/openid-configuration":
                    self._send(200, provider.discovery())
                elif url.path == "/jwks":
                    self._send(200, provider.jwks())
                elif url.path == "/authorize":
                    status, headers = provider.authorize(query)
                    self._send(status, None, headers)
                else:
                    self._send(404, {"error": "not_found"})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                auth = self.headers.get("Authorization", "")
                basic = auth[6:] if auth.startswith("Basic ") else None
                if urlsplit(self.path).path != "/token":
                    self._send(404, {"error": "not_found"})
                    return
                self._send(*provider.token(form, basic))

        return Handler
