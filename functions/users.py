"""`/auth/refresh`, `/user/profile` and `/user/api-keys`: the caller's account in server mode."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, request

from functions.auth import bearer, issue_access_token
from functions.state import caller, parse_body, state
from shared import users
from shared.errors import InvalidRequest, Unauthorized
from shared.users import Permission

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
    refresh = await users.issue_refresh(st.redis, user_id, st.settings.refresh_token_ttl_s)
    return {"access_token": access, "token_type": "Bearer", "expires_in": ttl,
            "refresh_token": refresh}


@bp.post("/auth/refresh")
async def refresh() -> Any:
    """Spend a refresh token (body ``refresh_token``, or the bearer) for a new pair."""
    if not state().settings.auth:
        raise InvalidRequest("Authentication is off: there are no tokens to refresh")
    body = await parse_body(RefreshRequest) if await request.get_data() else RefreshRequest(
        refresh_token=None)
    token = body.refresh_token or bearer()
    if not token:
        raise Unauthorized("Send the refresh token as 'refresh_token' or as the bearer")
    return await tokens_for(await users.redeem_refresh(state().redis, token))


@bp.get("/user/profile")
async def profile() -> Any:
    if not state().settings.auth:
        return {"id": caller(), "object": "user", "name": caller(), "email": None, "admin": True}
    return (await users.get_user(state().redis, caller())).model_dump()


@bp.post("/user/api-keys")
async def create_key() -> Any:
    body = await parse_body(NewApiKey)
    key, secret = await users.create_key(state().redis, caller(), body.name, body.permissions)
    return {**key.model_dump(), "key": secret}  # the only time the secret is shown


@bp.get("/user/api-keys")
async def list_keys() -> Any:
    keys = await users.list_keys(state().redis, caller())
    return {"object": "list", "data": [k.model_dump() for k in keys]}


@bp.delete("/user/api-keys/<key_id>")
async def revoke_key(key_id: str) -> Any:
    await users.revoke_key(state().redis, caller(), key_id)
    return {"id": key_id, "object": "api_key.deleted", "deleted": True}
