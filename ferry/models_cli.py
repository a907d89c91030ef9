"""`ferry models list | import | pull | start | stop | rm`: the model registry from a terminal."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from redis.asyncio import Redis

from shared.errors import FerryError
from shared.fleet import control
from shared.redis import connect
from shared.registry import downloads, gguf_info, models
from shared.registry.models import ModelRecord, model_id_from_path
from shared.registry.sources import check_url, file_name
from shared.settings import Settings

URL_FILE = "url"  # `ferry serve` writes its embedded Redis' URL here, under DATA_DIR/redis


def redis_url(settings: Settings) -> str:
    if settings.redis_url:
        return settings.redis_url
    written = settings.data_dir / "redis" / URL_FILE
    if written.exists():
        return written.read_text().strip()
    raise SystemExit("No Redis: set REDIS_URL, or start `ferry serve` first")


def main(settings: Settings, command: str, args: dict[str, str | None]) -> int:
    try:
        return asyncio.run(_run(settings, command, args))
    except FerryError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1


async def _run(settings: Settings, command: str, args: dict[str, str | None]) -> int:
    redis = await connect(redis_url(settings))
    try:
        if command == "list":
            for r in await models.all_models(redis):
                state = await models.current_state(redis, r)
                size = r.metadata.get("size", 0) / 1e6
                print(f"{r.id:<32} {state:<12} {size:>9.1f} MB  {r.path or r.source_url or ''}")
        elif command == "import":
            record = await _import(redis, settings, Path(args["path"] or ""), args.get("id"))
            print(f"imported {record.id} ({record.metadata.get('architecture')}, "
                  f"{record.metadata.get('quantization')})")
        elif command == "pull":
            return await _pull(redis, settings, args["url"] or "", args.get("id"),
                               args.get("sha256"))
        elif command == "start":
            worker = await control.start(redis, settings, args["id"] or "")
            print(f"{args['id']} running on worker {worker.id} ({worker.host}, {worker.device})")
        elif command == "stop":
            await control.stop(redis, settings, args["id"] or "")
            print(f"{args['id']} stopped")
        elif command == "rm":
            await control.delete(redis, settings, args["id"] or "")
            print(f"removed {args['id']}")
        return 0
    finally:
        await redis.aclose()


async def _import(redis: Redis, settings: Settings, path: Path, model: str | None) -> ModelRecord:
    """Register a local GGUF: linked into the models folder, so `ferry worker --model ID` finds it."""
    path = path.expanduser().absolute()  # keep the name the user gave, link or not
    if not path.is_file():
        raise SystemExit(f"no file {path}")
    header = await asyncio.to_thread(gguf_info.read, path)
    model = model or model_id_from_path(path)
    folder = settings.models_path / model
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / path.name
    if not link.exists():
        link.symlink_to(path)
    record = ModelRecord(id=model, created=int(time.time()), path=str(link)).describe(header)
    if not await models.claim(redis, record):
        raise SystemExit(f"a model with id {model!r} already exists")
    return record


async def _pull(redis: Redis, settings: Settings, url: str, model: str | None,
                sha256: str | None) -> int:
    check_url(url)
    model = model or file_name(url).removesuffix(".gguf").lower()
    record = ModelRecord(id=model, created=int(time.time()), source_url=url, state="downloading")
    if not await models.claim(redis, record):
        raise SystemExit(f"a model with id {model!r} already exists or is downloading")
    done = await downloads.run(redis, settings, record, sha256, on_progress=_bar)
    print(file=sys.stderr)
    if done.state != "downloaded":
        print(f"error: {done.error}", file=sys.stderr)
        return 1
    print(f"downloaded {done.id} to {done.path}")
    return 0


def _bar(done: int, total: int | None, width: int = 40) -> None:
    if total:
        filled = int(width * done / total)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done / total:6.1%} {done / 1e6:8.1f} MB"
    else:
        line = f"{done / 1e6:8.1f} MB"
    print(f"\r{line}", end="", file=sys.stderr, flush=True)
