"""`/auth/refresh`, `/user/profile` and `/user/api-keys`: the caller's account in server mode."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, request

from functions.context import caller, state
from functions.http import schemas as r
from functions.http.body import parse_body
from functions.http.openapi import operation
from functions.identity.auth import bearer
from shared.credentials import accounts
from shared.credentials.accounts import ApiKey, Permission, User
from shared.credentials.tokens import issue_access_token
from shared.errors import InvalidRequest, Unauthorized


class TokenPair(BaseModel):
    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int
    refresh_token: str


class LoggedIn(TokenPair):
    user: User


class NewKey(ApiKey):
    key: str  # the secret, shown this once


bp = Blueprint("users", __name__)


class RefreshRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    refresh_token: str | None = Field(None, max_length=256)


class NewApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=128)
    permissions: list[Permission] = Field(["read", "write"], min_length=1)


async def tokens_for(user_id: str) -> dict[str, Any]:
    """A new access JWT and refresh token, in OAuth2's token response shape."""
    st = state()
    access, ttl = issue_access_token(st.settings, user_id)
    refresh = await accounts.issue_refresh(st.redis, user_id, st.settings.refresh_token_ttl_s)
    return {"access_token": access, "token_type": "Bearer", "expires_in": ttl,
            "refresh_token": refresh}


@bp.post("/auth/refresh")
@operation("Spend a refresh token for new tokens", body=RefreshRequest, response=TokenPair)
async def refresh() -> Any:
    """Spend a refresh token (body ``refresh_token``, or the bearer) for a new pair."""
    if not state().settings.auth:
        raise InvalidRequest("Authentication is off: there are no tokens to refresh")
    body = await parse_body(RefreshRequest) if await request.get_data() else RefreshRequest(
        refresh_token=None)
    token = body.refresh_token or bearer()
    if not token:
        raise Unauthorized("Send the refresh token as 'refresh_token' or as the bearer")
    return await tokens_for(await accounts.redeem_refresh(state().redis, token))


@bp.get("/user/profile")
@operation("The caller", response=User)
async def profile() -> Any:
    if not state().settings.auth:
        return accounts.User(id=caller(), name=caller(), admin=True, created_at=0).model_dump()
    return (await accounts.get_user(state().redis, caller())).model_dump()


@bp.post("/user/api-keys")
@operation("Create an API key (its secret is shown once)", body=NewApiKey, response=NewKey)
async def create_key() -> Any:
    body = await parse_body(NewApiKey)
    key, secret = await accounts.create_key(state().redis, caller(), body.name, body.permissions)
    return {**key.model_dump(), "key": secret}  # the only time the secret is shown


@bp.get("/user/api-keys")
@operation("List the caller's API keys", response=r.Page[ApiKey])
async def list_keys() -> Any:
    keys = await accounts.list_keys(state().redis, caller())
    return {"object": "list", "data": [k.model_dump() for k in keys]}


@bp.delete("/user/api-keys/<key_id>")
@operation("Revoke an API key", response=r.Deleted)
async def revoke_key(key_id: str) -> Any:
    await accounts.revoke_key(state().redis, caller(), key_id)
    return {"id": key_id, "object": "api_key.deleted", "deleted": True}
