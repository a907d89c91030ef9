"""`ferry users create|token` and `ferry keys create`: accounts for offline installs, from a terminal."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, get_args

from ferry.models_cli import redis_url
from shared.credentials import accounts
from shared.errors import FerryError
from shared.redis import connect
from shared.settings import Settings


def main(settings: Settings, command: str, args: dict[str, Any]) -> int:
    try:
        return asyncio.run(_run(settings, command, args))
    except FerryError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1


async def _run(settings: Settings, command: str, args: dict[str, Any]) -> int:
    redis = await connect(redis_url(settings))
    try:
        if command == "users create":
            user = await accounts.create_user(redis, args["name"], args.get("email"), args["admin"])
            print(f"created user {user.name} ({user.id}{', admin' if user.admin else ''})")
            return 0
        user_found = await accounts.find_user(redis, args["user"] if command == "keys create"
                                           else args["name"])
        if user_found is None:
            print("error: no such user", file=sys.stderr)
            return 1
        if command == "keys create":
            permissions = [p.strip() for p in args["permissions"].split(",") if p.strip()]
            if not set(permissions) <= set(get_args(accounts.Permission)):
                print("error: permissions are read, write or both", file=sys.stderr)
                return 1
            key, secret = await accounts.create_key(redis, user_found.id, args["key_name"],
                                                 permissions)  # type: ignore[arg-type]  # checked above
            print(f"# {key.id} for {user_found.name}: {','.join(key.permissions)}", file=sys.stderr)
            print(secret)
            return 0
        # users token: a JWT and refresh token, for a user with no OpenID Connect login
        from shared.credentials.tokens import issue_access_token

        access, ttl = issue_access_token(settings, user_found.id)
        refresh = await accounts.issue_refresh(redis, user_found.id, settings.refresh_token_ttl_s)
        print(f"access_token={access}\nrefresh_token={refresh}\nexpires_in={ttl}")
        return 0
    finally:
        await redis.aclose()
