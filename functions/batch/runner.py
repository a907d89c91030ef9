"""Runs batches: each line an ordinary job on its model's queue, behind interactive requests.

Every web process runs a `BatchRunner`. One process at a time drives a batch, the holder of its
lease in Redis; if that process dies the lease lapses and another (or the same one, restarted)
goes on from the batch's state in Redis: the validated lines, how many went to the queue, the job
of each line still running, and each finished line's result. Results are keyed by line, so a line
run twice after a crash still appears once, and a line whose job was lost (its worker died, or it
never reached the queue) runs again under a new job id.

A model's batch lines in the queue are bounded (`window`): a running batch leaves
``FERRY_BATCH_RESERVE`` sequences of every worker to interactive requests, and the rest of them
queue ahead of its lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
import uuid
from collections.abc import Iterable
from typing import Any

import orjson
from pydantic import ValidationError
from redis.exceptions import RedisError

from functions.batch.file_store import file_store, lines
from functions.context import FerryState, invalid
from functions.openai.protocol import ChatCompletionRequest, CompletionRequest
from functions.openai.render import Renderer
from functions.queue.reader import TAKE_GRACE_S, JobMeta, has_ended, read_all, submit, taken_s_ago, withdraw
from shared import keys
from shared.errors import FerryError, InvalidRequest, from_wire
from shared.fleet import liveness
from shared.jobs import Delta, Error, Final, cancel_value
from shared.registry import models
from shared.storage import store
from shared.storage.objects import Batch, BatchCounts, FileObject

log = logging.getLogger(__name__)

LEASE_S = 10
TICK_S = 0.05  # a line that ends waits at most this long for the next to go in
MAX_ERRORS = 100  # validation errors reported per batch


class BatchRunner:
    def __init__(self, st: Any) -> None:
        self.st = st
        self.id = uuid.uuid4().hex
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.main = asyncio.create_task(self._run())

    async def _run(self) -> None:
        """Take up every unfinished batch no live process is driving."""
        redis = self.st.redis
        while True:
            try:
                for raw in await redis.smembers(keys.BATCHES):
                    batch_id = raw.decode()
                    task = self.tasks.get(batch_id)
                    if (task is None or task.done()) and await redis.set(
                            keys.batch(batch_id, "lease"), self.id, nx=True, ex=LEASE_S):
                        self.tasks[batch_id] = asyncio.create_task(self._drive(batch_id))
            except (RedisError, OSError):
                log.warning("batch runner cannot reach Redis; retrying", exc_info=True)
            await asyncio.sleep(1)

    async def close(self) -> None:
        tasks = [self.main, *self.tasks.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _drive(self, batch_id: str) -> None:
        try:
            await BatchDriver(self.st, batch_id, self.id).run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s: driver failed; another runner takes over", batch_id)


class BatchDriver:
    """Moves one batch forward, a tick at a time, while it holds the batch's lease."""

    def __init__(self, st: FerryState, batch_id: str, runner_id: str) -> None:
        self.st = st
        self.redis = st.redis
        self.id = batch_id
        self.runner_id = runner_id

    def key(self, part: str) -> str:
        return keys.batch(self.id, part)

    async def run(self) -> None:
        while await self._renew():
            raw = await self.redis.get(keys.obj("batch", self.id))
            if raw is None:
                await self.redis.srem(keys.BATCHES, self.id)
                return
            batch = Batch.model_validate_json(raw)
            if batch.status in ("completed", "failed", "expired", "cancelled"):
                await self._forget()
                return
            if batch.status == "validating":
                await self._validate(batch)
            elif batch.status == "cancelling":
                if await self._stop():
                    await self._finalize(batch, "cancelled")
            elif batch.expires_at is not None and time.time() >= batch.expires_at:
                await self._stop()
                await self._finalize(batch, "expired")
            elif batch.status == "finalizing":
                await self._finalize(batch, "completed")
            else:
                await self._collect(batch)
                if await self._submit(batch):
                    await self._update({"in_progress"}, status="finalizing",
                                       finalizing_at=int(time.time()))
            await asyncio.sleep(TICK_S)

    async def _renew(self) -> bool:
        lease = self.key("lease")
        if await self.redis.get(lease) != self.runner_id.encode():
            return False
        await self.redis.expire(lease, LEASE_S)
        return True

    async def _update(self, when: set[str] | None = None, **changes: Any) -> Batch | None:
        return await store.update(self.redis, Batch, self.id, when, **changes)

    # Validation: the whole file, before anything runs

    async def _validate(self, batch: Batch) -> None:
        settings = self.st.settings
        try:
            found = await asyncio.to_thread(
                _read_lines, file_store(settings).chunks(batch.input_file_id), batch.endpoint,
                settings.batch_max_lines)
        except Exception as e:  # gone from the store, or the store unreachable
            found = [], [_error("file_unreadable", None, f"The input file cannot be read: {e}")]
        entries, errors = found
        for model, line in _first_of_each_model(entries):
            try:
                await models.get_or_bundled(self.redis, model or settings.default_model,
                                            settings.models_path)
            except FerryError:
                errors.append(_error("model_not_found", line, f"No model '{model}'", "body.model"))
        if not entries and not errors:
            errors.append(_error("empty_file", None, "The input file has no requests"))
        if errors:
            await self._update({"validating"}, status="failed", failed_at=int(time.time()),
                               errors={"object": "list", "data": errors[:MAX_ERRORS]})
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key("input"), self.key("next"), self.key("running"),
                        self.key("results"))
            for k in range(0, len(entries), 1000):
                pipe.hset(self.key("input"), mapping={
                    str(k + j): orjson.dumps(e).decode() for j, e in enumerate(entries[k:k + 1000])})
            await pipe.execute()
        now = int(time.time())
        await self._update({"validating"}, status="in_progress", in_progress_at=now,
                           expires_at=batch.created_at + int(settings.batch_window_s),
                           request_counts=BatchCounts(total=len(entries)))

    # Running: hand lines to the queue, collect what finished

    async def _submit(self, batch: Batch) -> bool:
        """Queue lines while the models' windows allow; True when every line has a result."""
        total = batch.request_counts.total
        sent = int(await self.redis.get(self.key("next")) or 0)
        while sent < total:
            entry = orjson.loads(await self.redis.hget(self.key("input"), str(sent)))
            model = (entry["body"].get("model") or self.st.settings.default_model)
            if await self.redis.scard(keys.batch_lines(model)) >= await self._window(model):
                break
            await self._start(batch, sent, entry, attempt=0)
            sent += 1
        return sent >= total and not await self.redis.hlen(self.key("running"))

    async def _window(self, model: str) -> int:
        per_worker = max(1, self.st.settings.parallel - self.st.settings.batch_reserve)
        return max(1, len(await liveness.live_workers(self.redis, model)) * per_worker)

    async def _start(self, batch: Batch, line: int, entry: dict[str, Any], attempt: int) -> None:
        """Record the line as running, then queue its job (a crash in between leaves a running
        line with no job, which `_collect` finds lost and queues again)."""
        request_model = ChatCompletionRequest if batch.endpoint.endswith("/chat/completions") \
            else CompletionRequest
        try:
            request = request_model.model_validate(entry["body"])
            record = await models.get_or_bundled(
                self.redis, request.model or self.st.settings.default_model,
                self.st.settings.models_path)
            job = request.to_job(record.id)
        except (ValidationError, FerryError) as e:
            error = invalid(e) if isinstance(e, ValidationError) else e
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.key("results"), str(line), _result(entry, error.status,
                                                                  error.to_dict(), ok=False))
                pipe.hdel(self.key("running"), str(line))
                if attempt == 0:
                    pipe.set(self.key("next"), line + 1)
                await pipe.execute()
            await self._count(failed=1)
            return
        job.id = f"{self.id}-{line}-{attempt}"
        meta = JobMeta(id=job.id, kind=job.kind, model=record.id, created=int(time.time()),
                       choices=job.choice_count)
        running = {**meta.model_dump(), "attempt": attempt}  # what _finish renders with
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key("running"), str(line), orjson.dumps(running).decode())
            pipe.sadd(keys.batch_lines(record.id), job.id)
            if attempt == 0:
                pipe.set(self.key("next"), line + 1)
            await pipe.execute()
        try:
            await submit(self.redis, job, meta, self.st.settings, background=True)
        except FerryError as e:  # queue full, no worker yet: it goes again from `_collect`
            log.info("batch %s line %d not queued yet: %s", self.id, line, e.message)

    async def _collect(self, batch: Batch) -> None:
        for line_b, raw in (await self.redis.hgetall(self.key("running"))).items():
            line, running = int(line_b), orjson.loads(raw)
            if await has_ended(self.redis, running["id"]):
                await self._finish(line, running)
            elif await self._lost(running):
                log.warning("batch %s: job %s was lost; running line %d again", self.id,
                            running["id"], line)
                await withdraw(self.redis, running["id"], running["model"], self.st.settings)
                await self.redis.srem(keys.batch_lines(running["model"]), running["id"])
                entry = orjson.loads(await self.redis.hget(self.key("input"), str(line)))
                await self._start(batch, line, entry, running["attempt"] + 1)

    async def _lost(self, running: dict[str, Any]) -> bool:
        """Whether the line's job, whose stream has no end yet, will never end: it is not
        queued (it never got there, or arq dropped it: a job arq finds orphaned after its
        worker died is not run again), or its worker died under it, even before recording
        itself as the owner."""
        if await self.redis.zscore(keys.queue(running["model"]), running["id"]) is None:
            return True
        owner = await self.redis.get(keys.job_worker(running["id"]))
        if owner is None:  # lost too if its worker died before recording itself as the owner
            taken = await taken_s_ago(self.redis, running["id"], self.st.settings)
            return taken is not None and taken > TAKE_GRACE_S
        return not await liveness.is_alive(self.redis, owner.decode())

    async def _finish(self, line: int, running: dict[str, Any]) -> None:
        meta = JobMeta.model_validate(running)
        messages = await read_all(self.redis, meta.id)
        end = messages[-1]
        entry = orjson.loads(await self.redis.hget(self.key("input"), str(line)))
        if isinstance(end, Final):
            body = Renderer(meta).response([m for m in messages if isinstance(m, Delta)],
                                           end.usage, meta.choices)
            result, ok = _result(entry, 200, body, ok=True), True
        else:
            assert isinstance(end, Error)
            error = from_wire(end.status, end.message, end.code, end.param)
            result, ok = _result(entry, end.status, error.to_dict(), ok=False), False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key("results"), str(line), result)
            pipe.hdel(self.key("running"), str(line))
            pipe.srem(keys.batch_lines(meta.model), meta.id)
            placed = await pipe.execute()
        if placed[0]:  # a new result, not one written again after a crash
            usage = end.usage if isinstance(end, Final) else None
            await self._count(completed=int(ok), failed=int(not ok), usage=usage)

    async def _count(self, completed: int = 0, failed: int = 0, usage: Any = None) -> None:
        raw = await self.redis.get(keys.obj("batch", self.id))
        if raw is None:
            return
        batch = Batch.model_validate_json(raw)
        counts = batch.request_counts.model_copy(update={
            "completed": batch.request_counts.completed + completed,
            "failed": batch.request_counts.failed + failed})
        totals = dict(batch.usage)
        if usage is not None:
            totals["input_tokens"] += usage.prompt_tokens
            totals["output_tokens"] += usage.completion_tokens
            totals["total_tokens"] += usage.total_tokens
            totals["input_tokens_details"] = {
                "cached_tokens": totals["input_tokens_details"]["cached_tokens"]
                + usage.cached_tokens}
        await self._update(None, request_counts=counts, usage=totals)

    # Ending: cancel, expiry, results

    async def _stop(self) -> bool:
        """Queued lines leave the queue now; running ones are asked to stop. True once none
        is left running."""
        settings = self.st.settings
        for line_b, raw in (await self.redis.hgetall(self.key("running"))).items():
            running = orjson.loads(raw)
            job, model = running["id"], running["model"]
            if await has_ended(self.redis, job):
                await self._finish(int(line_b), running)  # it ended in time: keep it
            elif await self.redis.exists(keys.job_worker(job)) and not await self._lost(running):
                # Running: it stops at its next token, and is collected once it has.
                await self.redis.set(keys.job_cancel(job), cancel_value(), ex=settings.stream_ttl_s)
            else:
                await withdraw(self.redis, job, model, settings)
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.hdel(self.key("running"), line_b)
                    pipe.srem(keys.batch_lines(model), job)
                    await pipe.execute()
        return not await self.redis.hlen(self.key("running"))

    async def _finalize(self, batch: Batch, status: str) -> None:
        """Write the output and error files (lines in input order), then end the batch. The
        counts and usage are taken again from the results: a runner killed between storing a
        line's result and counting it leaves the running totals one short."""
        results = {int(k): orjson.loads(v)
                   for k, v in (await self.redis.hgetall(self.key("results"))).items()}
        counts, usage = _totals(batch, results.values())
        if status == "expired":
            for line in range(batch.request_counts.total):
                if line not in results:
                    entry = orjson.loads(await self.redis.hget(self.key("input"), str(line)))
                    error = InvalidRequest("The batch expired before this request ran",
                                           code="batch_expired")
                    results[line] = orjson.loads(_result(entry, 400, error.to_dict(), ok=False))
        outputs: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for line in sorted(results):
            (outputs if results[line].pop("ok") else errors).append(results[line])
        output_id = await self._write(batch, "output", outputs)
        error_id = await self._write(batch, "error", errors)
        now = int(time.time())
        stamp = {"completed": "completed_at", "expired": "expired_at",
                 "cancelled": "cancelled_at"}[status]
        await self._update(None, status=status, output_file_id=output_id,
                           error_file_id=error_id, request_counts=counts, usage=usage,
                           **{stamp: now})
        await self._forget()

    async def _write(self, batch: Batch, kind: str, results: list[dict[str, Any]]) -> str | None:
        if not results:
            return None
        file_id = f"file-{self.id.removeprefix('batch_')}-{kind}"  # the same if written again

        def write() -> int:
            with tempfile.TemporaryFile() as f:
                for r in results:
                    f.write(orjson.dumps(r) + b"\n")
                f.seek(0)
                return file_store(self.st.settings).put(file_id, f)

        size = await asyncio.to_thread(write)
        await store.create(self.redis, FileObject(
            id=file_id, owner=batch.owner, bytes=size, filename=f"{batch.id}_{kind}.jsonl",
            purpose="batch_output"))
        return file_id

    async def _forget(self) -> None:
        running = [orjson.loads(r) for r in await self.redis.hvals(self.key("running"))]
        async with self.redis.pipeline(transaction=True) as pipe:
            for r in running:  # still running when the batch expired: its place is free again
                pipe.srem(keys.batch_lines(r["model"]), r["id"])
            pipe.delete(*(self.key(p) for p in ("input", "next", "running", "results", "lease")))
            pipe.srem(keys.BATCHES, self.id)
            await pipe.execute()


def _read_lines(chunks: Iterable[bytes], endpoint: str, max_lines: int
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every request of the input file, checked: `{custom_id, method: POST, url, body}`, unique
    ids, the batch's endpoint, no streaming. Returns (requests, errors)."""
    entries: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(lines(chunks), start=1):
        if not raw.strip():
            continue
        if len(entries) >= max_lines:
            errors.append(_error("too_many_lines", number,
                                 f"A batch may have at most {max_lines} requests"))
            break
        entry, error = _check_line(raw, endpoint, seen)
        if error is not None:
            errors.append({**error, "line": number})
            if len(errors) >= MAX_ERRORS:
                break
        else:
            entries.append({**entry, "line": number})
    return entries, errors


def _check_line(raw: bytes, endpoint: str, seen: set[str]
                ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the request, None), or ({}, what is wrong with it)."""
    def wrong(code: str, message: str, param: str | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        return {}, _error(code, None, message, param)

    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return wrong("invalid_json_line", "This line is not valid JSON")
    if not isinstance(item, dict):
        return wrong("invalid_request", "Each line must be a JSON object")
    for field in ("custom_id", "method", "url", "body"):
        if field not in item:
            return wrong("missing_required_parameter", f"Missing '{field}'", field)
    custom_id, body = item["custom_id"], item["body"]
    if not isinstance(custom_id, str) or not custom_id:
        return wrong("invalid_request", "custom_id must be a non-empty string", "custom_id")
    if custom_id in seen:
        return wrong("duplicate_custom_id",
                     f"custom_id '{custom_id[:100]}' appears more than once", "custom_id")
    seen.add(custom_id)
    if item["method"] != "POST":
        return wrong("invalid_method", "method must be POST", "method")
    if item["url"] != endpoint:
        return wrong("mismatched_endpoint",
                     f"url '{str(item['url'])[:100]}' is not the batch's endpoint {endpoint}",
                     "url")
    if not isinstance(body, dict):
        return wrong("invalid_request", "body must be a JSON object", "body")
    if body.get("stream"):
        return wrong("stream_unsupported", "Batch requests cannot stream", "body.stream")
    return {"custom_id": custom_id, "body": body}, None


def _first_of_each_model(entries: Iterable[dict[str, Any]]) -> list[tuple[str | None, int]]:
    first: dict[str | None, int] = {}
    for e in entries:
        first.setdefault(e["body"].get("model"), e["line"])
    return list(first.items())


def _error(code: str, line: int | None, message: str, param: str | None = None
           ) -> dict[str, Any]:
    return {"code": code, "line": line, "message": message, "param": param}


def _totals(batch: Batch, results: Iterable[dict[str, Any]]) -> tuple[BatchCounts, dict[str, Any]]:
    """The request counts and token usage of the lines that ran, from their results."""
    completed = failed = prompt = output = cached = 0
    for r in results:
        if not r["ok"]:
            failed += 1
            continue
        completed += 1
        used = r["response"]["body"]["usage"]
        prompt += used["prompt_tokens"]
        output += used["completion_tokens"]
        cached += used["prompt_tokens_details"]["cached_tokens"]
    counts = batch.request_counts.model_copy(update={"completed": completed, "failed": failed})
    return counts, {**batch.usage, "input_tokens": prompt, "output_tokens": output,
                    "total_tokens": prompt + output,
                    "input_tokens_details": {"cached_tokens": cached}}


def _result(entry: dict[str, Any], status: int, body: dict[str, Any], ok: bool) -> str:
    """One line of the output or error file, as OpenAI writes them (`ok` says which file)."""
    return orjson.dumps({
        "id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": entry["custom_id"],
        "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
        "error": None, "ok": ok}).decode()
