"""Who is calling: the bearer token on every request in server mode (``FERRY_AUTH=on``).

Two kinds of bearer token: a JWT Ferry issued (HS256 with ``FERRY_JWT_SECRET``, or RS256/ES256
with the key pair in ``FERRY_JWT_PRIVATE_KEY_FILE``; expiry, issuer and audience checked) and an
API key (``sk-ferry-…``, looked up by its hash on every request, so revoking one takes effect at
once). A key with only ``read`` may use GET and HEAD; everything
else needs ``write``. Model downloads, starts, stops and deletes need an admin.
With auth off every request is the one local user, with every permission.
"""

from __future__ import annotations

from dataclasses import dataclass

import jwt
from quart import g, request

from functions.context import LOCAL_USER, state
from shared.credentials import accounts, tokens
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


def bearer() -> str | None:
    """The token in ``Authorization: Bearer …``, else in ``x-api-key`` (Anthropic's header);
    None without either, 401 when malformed."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        return request.headers.get("x-api-key", "").strip() or None
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
            claims = tokens.verify_access_token(settings, token)
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
