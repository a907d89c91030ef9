"""`/auth/google` and its callback: log in through an OpenID Connect provider (Google by default).

`GET /auth/google` sends the browser to the provider with a fresh state, nonce and PKCE challenge;
the provider sends it back to `GET /auth/google/callback?code=…&state=…`, which redeems the code,
checks the ID token, finds or creates the user, and answers with Ferry's access and refresh tokens.
"""

from __future__ import annotations

from typing import Any

import httpx
from quart import Blueprint, redirect, request

from functions.context import state
from functions.http.openapi import operation
from functions.identity import oidc
from functions.identity.users import LoggedIn, tokens_for
from shared.credentials import accounts
from shared.errors import InvalidRequest, NotFound

bp = Blueprint("login", __name__)


def _enabled() -> None:
    settings = state().settings
    if not settings.auth or not oidc.configured(settings):
        raise NotFound("Login through an OpenID Connect provider is not configured here "
                       "(FERRY_AUTH=on and FERRY_OIDC_CLIENT_ID)", code="login_not_configured")


@bp.get("/auth/google")
@operation("Log in with the OpenID Connect provider (redirect)", status=302)
async def begin() -> Any:
    _enabled()
    st = state()
    callback = st.settings.oidc_redirect_uri or f"{request.host_url}auth/google/callback"
    async with httpx.AsyncClient(timeout=10) as http:
        url = await oidc.begin(st.redis, st.settings, http, callback)
    return redirect(url, 302)


@bp.get("/auth/google/callback")
@operation("The provider's callback: issues Ferry's tokens", response=LoggedIn)
async def callback() -> Any:
    _enabled()
    args = request.args
    if error := args.get("error"):
        raise InvalidRequest(f"The login provider refused the login ({error[:64]})",
                             code="login_refused")
    code, login_state = args.get("code", ""), args.get("state", "")
    if not code or not login_state or len(code) > 2048 or len(login_state) > 256:
        raise InvalidRequest("The callback needs 'code' and 'state'",
                             param="code" if not code else "state")
    st = state()
    async with httpx.AsyncClient(timeout=10) as http:
        claims = await oidc.finish(st.redis, st.settings, http, code, login_state)
    email = claims.get("email") if claims.get("email_verified", True) else None
    user = await accounts.user_for_identity(st.redis, claims["iss"], str(claims["sub"]),
                                         email, claims.get("name"))
    return {**await tokens_for(user.id), "user": user.model_dump()}
