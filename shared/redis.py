"""Connecting to Redis the way both sides need: arq's pool with orjson instead of pickle, and the
plain clients, from one `REDIS_URL`.

Besides `redis://`, `rediss://` and `unix://`, the URL may name Redis Sentinel, so a failover
(the master lost, a replica promoted) needs no restart: every new connection asks the sentinels
where the master is now. Its form, as other Redis clients spell it::

    redis+sentinel://[[user]:password@]host:26379[,host2:26379,...]/<master name>[/<db>]

The password is the master's; the sentinels are reached without one. `rediss+sentinel://` talks
TLS to the master.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import redis
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.sentinel import Sentinel

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CONNECT_TIMEOUT_S = 2


def serialize(obj: Any) -> bytes:
    # `default=repr` keeps arq's failure results (exception objects) from breaking serialisation.
    return orjson.dumps(obj, default=repr)


def deserialize(raw: bytes) -> Any:
    return orjson.loads(raw)


@dataclass(frozen=True)
class Sentinels:
    hosts: list[tuple[str, int]]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def sentinels(url: str) -> Sentinels | None:
    """The sentinels a `redis+sentinel://` URL names; None for any other URL."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        return None
    auth, _, hostlist = parts.netloc.rpartition("@")
    user, _, password = auth.partition(":")
    hosts = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        hosts.append((host.strip("[]") or "localhost", int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"REDIS_URL {parts.scheme}://…/<master name>[/<db>]: got '{parts.path}'")
    return Sentinels(hosts=hosts, master=unquote(path[0]), db=int(path[1]) if len(path) == 2 else 0,
                     username=unquote(user) or None, password=unquote(password) or None,
                     ssl=parts.scheme.startswith("rediss"))


def redis_settings(url: str) -> RedisSettings:
    """arq's settings for `url` (workers' consumers, and `connect`)."""
    if (s := sentinels(url)) is not None:
        return RedisSettings(host=s.hosts, sentinel=True, sentinel_master=s.master, database=s.db,
                             username=s.username, password=s.password, ssl=s.ssl,
                             conn_timeout=CONNECT_TIMEOUT_S)
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = CONNECT_TIMEOUT_S
    return settings


async def connect(url: str) -> ArqRedis:
    """An arq pool (a `redis.asyncio.Redis`) that enqueues jobs as JSON."""
    return await create_pool(
        redis_settings(url), job_serializer=serialize, job_deserializer=deserialize
    )


def client(url: str, **kwargs: Any) -> redis.Redis:
    """A blocking client (the publisher thread, the command line), Sentinel-aware like `connect`."""
    if (s := sentinels(url)) is None:
        return redis.Redis.from_url(url, **kwargs)
    kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT_S)
    return Sentinel(s.hosts, sentinel_kwargs={"socket_connect_timeout": CONNECT_TIMEOUT_S},
                    ssl=s.ssl, **kwargs).master_for(
        s.master, db=s.db, username=s.username, password=s.password)
