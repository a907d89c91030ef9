"""Who is calling: the bearer token on every request in server mode (``FERRY_AUTH=on``).

Two kinds of bearer token: a JWT Ferry issued (HS256 with ``FERRY_JWT_SECRET``, or RS256/ES256
with the key pair in ``FERRY_JWT_PRIVATE_KEY_FILE``; expiry, issuer and audience checked) and an
API key (``sk-ferry-…``, looked up by its hash on every request, so revoking one takes effect at
once). A key with only ``read`` may use GET and HEAD; everything
else needs ``write``. Model downloads, starts, stops and deletes need an admin.
With auth off every request is the one local user, with every permission.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from quart import g, request

from functions.context import LOCAL_USER, state
from shared.credentials import accounts
from shared.errors import Forbidden, NotFound, Unauthorized
from shared.settings import Settings

# Reached without a token: liveness, the docs, metrics, the login flow and token refresh.
PUBLIC = ("/health", "/metrics", "/openapi.json", "/api/swagger/", "/auth/", "/v1/auth/refresh",
          "/api/v1/auth/refresh")
READ_METHODS = {"GET", "HEAD", "OPTIONS"}


@dataclass(frozen=True)
class Identity:
    user_id: str
    permissions: frozenset[str]
    admin: bool
    via: str  # "jwt", "api_key" or "local"


LOCAL = Identity(LOCAL_USER, frozenset({"read", "write"}), admin=True, via="local")


def identity() -> Identity | None:
    """The caller, once `authenticate` ran; None on a public path without a token."""
    return g.get("identity")


async def authenticate() -> None:
    """`before_request`: resolve the bearer token, or refuse with 401/403."""
    st = state()
    if not st.settings.auth:
        g.identity = LOCAL
        return
    if request.method == "OPTIONS" or any(request.path.startswith(p) for p in PUBLIC):
        return  # a CORS preflight carries no credentials
    token = bearer()
    if token is None:
        raise Unauthorized("Missing bearer token: send 'Authorization: Bearer <token>'")
    who = await _resolve(token, st.settings)
    g.identity = who
    if request.method not in READ_METHODS and "write" not in who.permissions:
        raise Forbidden("This API key may only read; the request needs 'write'")


def require_admin() -> None:
    who = identity()
    if who is None or not who.admin:
        raise Forbidden("Only an administrator may change models")


def issue_access_token(settings: Settings, user_id: str) -> tuple[str, int]:
    """A signed JWT for `user_id` and its lifetime in seconds."""
    now = int(time.time())
    claims = {"sub": user_id, "iss": settings.jwt_issuer, "aud": settings.jwt_audience,
              "iat": now, "exp": now + settings.access_token_ttl_s}
    key = signing_key(settings)
    return jwt.encode(claims, key.sign, algorithm=key.algorithm), settings.access_token_ttl_s


def bearer() -> str | None:
    """The token in ``Authorization: Bearer …``; None without the header, 401 when malformed."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        return None
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Malformed Authorization header: expected 'Bearer <token>'")
    return token.strip()


async def _resolve(token: str, settings: Settings) -> Identity:
    redis = state().redis
    if token.startswith(accounts.KEY_PREFIX):
        key = await accounts.key_for(redis, token)
        if key is None:
            raise Unauthorized("Invalid or revoked API key")
        user_id, permissions, via = key.user_id, frozenset(key.permissions), "api_key"
    else:
        try:
            pair = signing_key(settings)
            claims = jwt.decode(token, pair.verify, algorithms=[pair.algorithm],
                                audience=settings.jwt_audience, issuer=settings.jwt_issuer,
                                options={"require": ["exp", "iat", "sub", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("The token has expired; refresh it") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("Invalid token") from None
        user_id, permissions, via = claims["sub"], frozenset({"read", "write"}), "jwt"
    try:
        user = await accounts.get_user(redis, user_id)
    except NotFound:  # deleted since the token or key was issued
        raise Unauthorized("The token's user no longer exists") from None
    return Identity(user.id, permissions, user.admin, via)


@dataclass(frozen=True)
class SigningKey:
    algorithm: str  # the only one accepted when verifying: no "none", no HS/RS confusion
    sign: Any
    verify: Any


def signing_key(settings: Settings) -> SigningKey:
    """The key pair in FERRY_JWT_PRIVATE_KEY_FILE (RSA: RS256, EC P-256: ES256), else the secret."""
    if settings.jwt_private_key_file is not None:
        return _key_pair(settings.jwt_private_key_file)
    if settings.jwt_secret is None:
        raise RuntimeError("FERRY_AUTH=on needs FERRY_JWT_SECRET or FERRY_JWT_PRIVATE_KEY_FILE")
    secret = settings.jwt_secret.get_secret_value()
    return SigningKey("HS256", secret, secret)


@functools.cache
def _key_pair(path: Path) -> SigningKey:
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if isinstance(private, rsa.RSAPrivateKey):
        algorithm = "RS256"
    elif isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp256r1":
        algorithm = "ES256"
    else:
        raise ValueError(f"{path}: expected an RSA or EC P-256 private key (PEM)")
    return SigningKey(algorithm, private, private.public_key())
