"""An OpenID Connect client for login: authorization code with PKCE (S256), state and nonce.

Google by default; any provider that publishes ``/.well-known/openid-configuration`` by
settings. The provider's metadata and signing keys are fetched when first needed and kept for an
hour (the keys again at once when a token names a key id they lack, as after a rotation).
A login that was begun is kept in Redis for ten minutes under the hash of its ``state``, and
taken out (GETDEL) by the callback, so a state is good for one callback only.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis

from shared import keys
from shared.errors import FerryError, InvalidRequest
from shared.settings import Settings

LOGIN_TTL_S = 600
CACHE_S = 3600
# Algorithms an ID token may be signed with; never "none" and never an HMAC (the secret would be
# the client secret, which Ferry does not use as a verification key).
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]


class ProviderUnreachable(FerryError):
    status = 502
    type = "login_provider_error"
    default_code = "login_provider_unreachable"


class Provider(BaseModel):
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    token_endpoint_auth_methods_supported: list[str] = ["client_secret_basic"]


class PendingLogin(BaseModel):
    verifier: str
    nonce: str
    redirect_uri: str


_providers: dict[str, tuple[float, Provider]] = {}
_jwks: dict[str, tuple[float, jwt.PyJWKSet]] = {}


def configured(settings: Settings) -> bool:
    return settings.oidc_client_id is not None


async def provider(settings: Settings, http: httpx.AsyncClient) -> Provider:
    issuer = settings.oidc_issuer.rstrip("/")
    cached = _providers.get(issuer)
    if cached and time.monotonic() - cached[0] < CACHE_S:
        return cached[1]
    url = _discovery_url(settings)
    try:
        found = Provider.model_validate(await _get_json(http, url))
    except ValidationError:
        raise ProviderUnreachable(f"{url} is not an OpenID Connect discovery document") from None
    if found.issuer.rstrip("/") != issuer:
        raise ProviderUnreachable(f"The provider at {issuer} calls itself {found.issuer}")
    _providers[issuer] = (time.monotonic(), found)
    return found


async def begin(redis: Redis, settings: Settings, http: httpx.AsyncClient, redirect_uri: str) -> str:
    """Remember a new login and return the provider's authorization URL to send the user to."""
    meta = await provider(settings, http)
    state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
    pending = PendingLogin(verifier=verifier, nonce=nonce, redirect_uri=redirect_uri)
    await redis.set(keys.login_state(_digest(state)), pending.model_dump_json(), ex=LOGIN_TTL_S)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    query = {"response_type": "code", "client_id": settings.oidc_client_id,
             "redirect_uri": redirect_uri, "scope": settings.oidc_scopes, "state": state,
             "nonce": nonce, "code_challenge": challenge.decode(), "code_challenge_method": "S256"}
    return f"{meta.authorization_endpoint}?{urlencode(query)}"


async def finish(redis: Redis, settings: Settings, http: httpx.AsyncClient, code: str, state: str
                 ) -> dict[str, Any]:
    """Redeem the callback's code for the ID token's verified claims (400 on a bad state or code)."""
    raw = await redis.getdel(keys.login_state(_digest(state)))
    if raw is None:
        raise InvalidRequest("Unknown, expired or already used login state", param="state",
                             code="invalid_state")
    pending = PendingLogin.model_validate_json(raw)
    meta = await provider(settings, http)
    form = {"grant_type": "authorization_code", "code": code,
            "redirect_uri": pending.redirect_uri, "code_verifier": pending.verifier}
    auth: Any = httpx.USE_CLIENT_DEFAULT  # or HTTP Basic, as the provider prefers
    secret = settings.oidc_client_secret.get_secret_value() if settings.oidc_client_secret else None
    if secret and "client_secret_basic" not in meta.token_endpoint_auth_methods_supported:
        form |= {"client_id": settings.oidc_client_id or "", "client_secret": secret}
    elif secret:
        auth = httpx.BasicAuth(settings.oidc_client_id or "", secret)
    else:
        form["client_id"] = settings.oidc_client_id or ""
    try:
        r = await http.post(meta.token_endpoint, data=form, auth=auth)
    except httpx.HTTPError as e:
        raise ProviderUnreachable(f"The login provider's token endpoint failed: {type(e).__name__}"
                                  ) from None
    if r.status_code >= 500:
        raise ProviderUnreachable(f"The login provider answered {r.status_code}")
    body = _json(r)
    if r.status_code != 200 or "id_token" not in body:
        # invalid_grant: a reused, expired or forged code, or a PKCE verifier that does not match.
        error = str(body.get("error", "invalid_grant"))[:64]
        raise InvalidRequest(f"The login provider refused the code ({error})", param="code",
                             code=error)
    return await _verify(settings, http, meta, str(body["id_token"]), pending.nonce)


async def _verify(settings: Settings, http: httpx.AsyncClient, meta: Provider, token: str,
                  nonce: str) -> dict[str, Any]:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
        key = await _signing_key(http, meta, kid)
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=ID_TOKEN_ALGORITHMS, audience=settings.oidc_client_id,
            issuer=meta.issuer, options={"require": ["iss", "sub", "aud", "exp", "iat"]})
    except jwt.InvalidTokenError as e:
        raise InvalidRequest(f"The login provider's ID token is not valid: {e}", param="code",
                             code="invalid_id_token") from None
    if not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
        raise InvalidRequest("The ID token's nonce does not match this login", param="code",
                             code="invalid_id_token")
    return claims


async def _signing_key(http: httpx.AsyncClient, meta: Provider, kid: str | None) -> jwt.PyJWK:
    for fresh in (False, True):
        cached = _jwks.get(meta.jwks_uri)
        if fresh or not cached or time.monotonic() - cached[0] >= CACHE_S:
            try:
                cached = (time.monotonic(), jwt.PyJWKSet.from_dict(await _get_json(http, meta.jwks_uri)))
            except jwt.PyJWKSetError as e:
                raise ProviderUnreachable(f"The login provider's keys are unusable: {e}") from None
            _jwks[meta.jwks_uri] = cached
        matches = [k for k in cached[1].keys if kid is None or k.key_id == kid]
        if matches:
            return matches[0]
    raise jwt.InvalidTokenError(f"no signing key {kid!r} at the provider")


async def reachable(settings: Settings, http: httpx.AsyncClient) -> bool:
    """Whether the provider answers its discovery document now (no cache)."""
    try:
        await _get_json(http, _discovery_url(settings))
        return True
    except ProviderUnreachable:
        return False


async def _get_json(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    try:
        r = await http.get(url)
        r.raise_for_status()
        return _json(r)
    except httpx.HTTPError as e:
        raise ProviderUnreachable(f"Could not read {url}: {type(e).__name__}") from None


def _discovery_url(settings: Settings) -> str:
    return f"{settings.oidc_issuer.rstrip('/')}/.well-known/openid-configuration"


def _json(r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {}


def _digest(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()
