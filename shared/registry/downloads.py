"""Download a model into the models folder: resume, verify, check the header, then register.

Bytes go to ``<id>/<file>.part`` and are renamed only when complete, verified (sha256 when given
or published beside the file) and read as a GGUF. A dropped connection resumes with Range from
what is on disk. Progress is kept in ``keys.download(id)`` for the API; a cancel key stops it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from redis.asyncio import Redis

from shared import keys
from shared.errors import FerryError, InvalidRequest
from shared.registry import gguf_info, models
from shared.registry.models import ModelRecord
from shared.registry.sources import file_name, open_source, published_sha256
from shared.settings import Settings

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5
STALLED_S = 30  # a download whose progress is older than this has no process behind it


class Cancelled(Exception):
    pass


async def run(
    redis: Redis, settings: Settings, record: ModelRecord, sha256: str | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> ModelRecord:
    """Fetch `record.source_url`; returns the registered record, or records the error."""
    assert record.source_url
    folder = settings.models_path / record.id
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / file_name(record.source_url)
    part = final.with_name(final.name + ".part")
    try:
        await _fetch(redis, settings, record, part, on_progress)
        expected = sha256 or await published_sha256(record.source_url)
        if expected and await asyncio.to_thread(_sha256, part) != expected.lower():
            raise InvalidRequest("sha256 mismatch: the file is not the one expected",
                                 param="sha256", code="checksum_mismatch")
        header = await asyncio.to_thread(gguf_info.read, part)
        part.rename(final)
    except Cancelled:
        shutil.rmtree(folder, ignore_errors=True)
        await models.forget(redis, record.id)
        await _progress(redis, record.id, state="cancelled")
        raise
    except (FerryError, OSError, httpx.HTTPError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        message = e.message if isinstance(e, FerryError) else f"download failed: {e}"
        failed = record.model_copy(update={"state": "error", "error": message})
        await models.register(redis, failed)
        await _progress(redis, record.id, state="error", error=message)
        return failed
    done = record.describe(header).model_copy(update={"state": "downloaded", "path": str(final)})
    await models.register(redis, done)
    await _progress(redis, record.id, state="downloaded")
    return done


async def _fetch(
    redis: Redis, settings: Settings, record: ModelRecord, part: Path,
    on_progress: Callable[[int, int | None], None] | None,
) -> None:
    assert record.source_url
    started, last_tick = time.monotonic(), 0.0
    for attempt in range(settings.download_retries + 1):
        have = part.stat().st_size if part.exists() else 0
        opened = await open_source(record.source_url, have, settings)
        done, total = opened.start, opened.total
        try:
            with part.open("r+b" if part.exists() else "wb") as out:
                out.seek(opened.start)
                out.truncate()
                async for chunk in opened.chunks:
                    out.write(chunk)
                    done += len(chunk)
                    if time.monotonic() - last_tick >= PROGRESS_EVERY_S:
                        last_tick = time.monotonic()
                        speed = int((done - have) / max(last_tick - started, 1e-3))
                        await _progress(redis, record.id, state="downloading", bytes_done=done,
                                        bytes_total=total or 0, speed=speed)
                        if on_progress:
                            on_progress(done, total)
                        if await redis.exists(keys.download_cancel(record.id)):
                            raise Cancelled
        except (httpx.TransportError, httpx.RemoteProtocolError) as e:
            log.warning("download of %s dropped at %d bytes (%s); resuming", record.id, done, e)
            await asyncio.sleep(min(0.2 * 2**attempt, 5))
            continue
        if total is None or done >= total:
            await _progress(redis, record.id, state="verifying", bytes_done=done,
                            bytes_total=total or done)
            if on_progress:
                on_progress(done, total)
            return
        log.warning("download of %s ended early at %d of %d bytes; resuming", record.id, done, total)
    raise InvalidRequest(f"the download kept failing after {settings.download_retries} resumes",
                         param="source_url", code="source_unavailable")


async def _progress(redis: Redis, model: str, **fields: str | int) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.download(model), mapping={**fields, "updated": int(time.time())})
        pipe.expire(keys.download(model), 24 * 3600)
        await pipe.execute()


def stalled(progress: dict[str, int | str]) -> bool:
    updated = int(progress.get("updated", 0))
    return time.time() - updated > STALLED_S


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
