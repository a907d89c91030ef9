"""Users, their API keys and refresh tokens, in Redis.

Secrets are random 32-byte tokens; only their SHA-256 is stored (a slow hash buys nothing for
high-entropy secrets), so a copy of Redis gives no usable key. An API key is looked up on every
request, so revoking one takes effect on the next. A refresh token is used once: redeeming it
deletes it (GETDEL), so a replayed one is refused.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Literal

from pydantic import BaseModel
from redis.asyncio import Redis

from shared import keys
from shared.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from shared.storage.objects import new_id

Permission = Literal["read", "write"]
KEY_PREFIX = "sk-ferry-"


class User(BaseModel):
    id: str
    object: str = "user"
    name: str
    email: str | None = None
    admin: bool = False
    created_at: int


class ApiKey(BaseModel):
    id: str
    object: str = "api_key"
    user_id: str
    name: str
    permissions: list[Permission]
    hint: str  # the first characters, so a user can tell keys apart
    created_at: int


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_user(redis: Redis, name: str, email: str | None = None, admin: bool = False
                      ) -> User:
    user = User(id=new_id("user"), name=name, email=email, admin=admin, created_at=int(time.time()))
    if not await redis.set(keys.user_by_name(name), user.id, nx=True):
        raise Conflict(f"A user named {name!r} exists", param="name")
    await redis.set(keys.user(user.id), user.model_dump_json())
    return user


async def get_user(redis: Redis, user_id: str) -> User:
    raw = await redis.get(keys.user(user_id))
    if raw is None:
        raise NotFound(f"No user {user_id!r}")
    return User.model_validate_json(raw)


async def user_for_identity(redis: Redis, issuer: str, subject: str, email: str | None,
                            name: str | None) -> User:
    """The user an OpenID Connect identity logs in as, created on its first login.

    Linked by issuer and subject, never by email: an email claim alone does not prove the caller
    owns an existing account of the same name.
    """
    link = keys.identity(digest(f"{issuer}\n{subject}"))
    if (user_id := await redis.get(link)) is not None:
        return await get_user(redis, user_id.decode())
    wanted = (email or name or subject)[:120]
    try:
        user = await create_user(redis, wanted, email=email)
    except Conflict:  # the name is taken (by a terminal-made user, say): keep both apart
        user = await create_user(redis, f"{wanted}#{secrets.token_hex(3)}", email=email)
    if not await redis.set(link, user.id, nx=True):  # a concurrent first login won the race
        await redis.delete(keys.user(user.id), keys.user_by_name(user.name))
        return await get_user(redis, (await redis.get(link)).decode())
    return user


async def find_user(redis: Redis, name: str) -> User | None:
    user_id = await redis.get(keys.user_by_name(name))
    return await get_user(redis, user_id.decode()) if user_id else None


async def create_key(redis: Redis, user_id: str, name: str, permissions: list[Permission]
                     ) -> tuple[ApiKey, str]:
    """A new key and its secret, which is shown once and never stored."""
    if not permissions:
        raise InvalidRequest("permissions must name read, write or both", param="permissions")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=new_id("key"), user_id=user_id, name=name, permissions=sorted(set(permissions)),
                 hint=secret[:len(KEY_PREFIX) + 4], created_at=int(time.time()))
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.api_key(digest(secret)), key.model_dump_json())
        pipe.hset(keys.user_keys(user_id), key.id, digest(secret))
        await pipe.execute()
    return key, secret


async def key_for(redis: Redis, secret: str) -> ApiKey | None:
    raw = await redis.get(keys.api_key(digest(secret)))
    return ApiKey.model_validate_json(raw) if raw else None


async def list_keys(redis: Redis, user_id: str) -> list[ApiKey]:
    hashes = list((await redis.hgetall(keys.user_keys(user_id))).values())
    raws = await redis.mget([keys.api_key(h.decode()) for h in hashes]) if hashes else []
    found = [ApiKey.model_validate_json(r) for r in raws if r]
    return sorted(found, key=lambda k: (k.created_at, k.id))


async def revoke_key(redis: Redis, user_id: str, key_id: str) -> None:
    hashed = await redis.hget(keys.user_keys(user_id), key_id)
    if hashed is None:
        raise NotFound(f"No API key {key_id!r}", param="key_id")
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.api_key(hashed.decode()))
        pipe.hdel(keys.user_keys(user_id), key_id)
        await pipe.execute()


async def issue_refresh(redis: Redis, user_id: str, ttl_s: int) -> str:
    token = secrets.token_urlsafe(32)
    await redis.set(keys.refresh_token(digest(token)), user_id, ex=ttl_s)
    return token


async def redeem_refresh(redis: Redis, token: str) -> str:
    """The user id a refresh token was issued to; the token is spent (a replay gets 401)."""
    user_id = await redis.getdel(keys.refresh_token(digest(token)))
    if user_id is None:
        raise Unauthorized("The refresh token is invalid, expired or already used")
    return user_id.decode()
