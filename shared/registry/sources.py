"""Where model bytes come from: http(s) with Range, s3:// through boto3, file://.

`open_source(url, offset)` returns where the bytes really start (a server may ignore Range), the
total size if known, and an async iterator of chunks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx

from shared.errors import InvalidRequest
from shared.settings import Settings

SCHEMES = ("https", "http", "s3", "file")
CHUNK = 1 << 20


@dataclass
class Opened:
    start: int
    total: int | None
    chunks: AsyncIterator[bytes]


def check_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in SCHEMES:
        raise InvalidRequest(f"source_url must use one of {', '.join(SCHEMES)}",
                             param="source_url", code="unsupported_scheme")
    if parsed.scheme in ("http", "https", "s3") and not parsed.netloc:
        raise InvalidRequest("source_url has no host or bucket", param="source_url")
    return url


def file_name(url: str) -> str:
    name = Path(unquote(urlparse(url).path)).name
    return name if name.endswith(".gguf") else "model.gguf"


async def open_source(url: str, offset: int, settings: Settings) -> Opened:
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        return await _http(url, offset)
    if scheme == "s3":
        return await _s3(url, offset, settings)
    return await _file(url, offset)


async def published_sha256(url: str) -> str | None:
    """The digest a server publishes beside the file (`<url>.sha256`), if it does."""
    if urlparse(url).scheme not in ("http", "https"):
        return None
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(url + ".sha256")
    except httpx.HTTPError:
        return None
    if r.status_code != 200 or not r.text.strip():
        return None
    return r.text.split()[0].lower()


async def _http(url: str, offset: int) -> Opened:
    client = httpx.AsyncClient(timeout=httpx.Timeout(30, read=60), follow_redirects=True)
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    response = await client.send(client.build_request("GET", url, headers=headers), stream=True)
    if response.status_code not in (200, 206):
        await response.aclose()
        await client.aclose()
        raise InvalidRequest(f"the source answered HTTP {response.status_code}",
                             param="source_url", code="source_unavailable")
    start = offset if response.status_code == 206 else 0
    length = response.headers.get("Content-Length")
    total = start + int(length) if length is not None else None

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_bytes(CHUNK):
                yield chunk
        finally:
            await response.aclose()
            await client.aclose()

    return Opened(start, total, chunks())


async def _s3(url: str, offset: int, settings: Settings) -> Opened:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urlparse(url)
    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url,
                          region_name=settings.s3_region)
    args: dict[str, Any] = {"Bucket": parsed.netloc, "Key": parsed.path.lstrip("/")}
    if offset:
        args["Range"] = f"bytes={offset}-"
    try:
        obj = await asyncio.to_thread(client.get_object, **args)
    except (BotoCoreError, ClientError) as e:
        raise InvalidRequest(f"the S3 source failed: {e}", param="source_url",
                             code="source_unavailable") from e
    start = offset if obj.get("ContentRange") else 0
    body = obj["Body"]

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while chunk := await asyncio.to_thread(body.read, CHUNK):
                yield chunk
        finally:
            body.close()

    return Opened(start, start + int(obj["ContentLength"]), chunks())


async def _file(url: str, offset: int) -> Opened:
    path = Path(unquote(urlparse(url).path))
    if not path.is_file():
        raise InvalidRequest(f"no file at {path}", param="source_url", code="source_unavailable")
    f = path.open("rb")
    f.seek(offset)

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                yield chunk
        finally:
            f.close()

    return Opened(offset, path.stat().st_size, chunks())
