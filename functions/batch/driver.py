"""Drives one batch through its states: validating -> in_progress -> finalizing (or cancelling,
or expired) -> ended, each line an ordinary job on its model's queue, behind interactive requests.

The batch's state is in Redis, so a driver that dies leaves it for the next to go on from: the
validated lines, how many went to the queue, the job of each line still running, and each
finished line's result. Results are keyed by line, so a line run twice after a crash still
appears once, and a line whose job was lost (its worker died, or it never reached the queue) runs
again under a new job id.

A worker says on a list of the batch's when a line's job has ended (`job.notify`), so a tick
finds the lines to collect in one round trip; every `LOOK_S` the driver looks at every running
line itself, for a notice lost or a worker that died.

A model's batch lines in the queue are bounded (`window`): twice every sequence of every worker
serving the model (its heartbeat says how many), so that lines wait in each worker's engine and
in Redis, never for this loop's tick. Workers run interactive jobs first: they queue ahead of
batch lines in Redis, and a worker's engine pauses batch lines to start them at once
(`workers.engine.scheduler`).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from typing import Any

import orjson
from pydantic import ValidationError

from functions.batch.endpoints import answer, embeds, job_of, request_of
from functions.batch.file_store import file_store
from functions.batch.results import result_line, totals
from functions.batch.validate import MAX_ERRORS, first_of_each_model, line_error, read_lines
from functions.context import FerryState
from functions.http.body import invalid
from functions.queue.handle import JobState, job_lost, job_state, request_cancel, withdraw
from functions.queue.reader import ended, has_ended, read_all
from functions.queue.submit import JobMeta, submit
from shared import keys
from shared.errors import FerryError, InvalidRequest, NotFound
from shared.fleet import liveness
from shared.jobs import Delta, Error, Final
from shared.registry import models
from shared.storage import store
from shared.storage.objects import Batch, BatchCounts, FileObject

log = logging.getLogger(__name__)

LEASE_S = 10
RENEW_S = 1.0  # how often the lease is renewed (and found still this runner's)
# How often a running batch's ended lines are collected and more are queued. Lines wait queued
# ahead (`_window`), so the tick paces no line; each tick's round trips take the CPU from the
# workers' decoding where both share a machine. Once every line is queued, the batch's end
# waits on the tick: it is shorter then.
TICK_S = 0.25
END_TICK_S = 0.05
# A worker says when a line's job ended (`job.notify`); every LOOK_S the driver also looks at
# every running line itself: one whose notice was lost, or whose worker died under it.
LOOK_S = 2.0


class BatchDriver:
    """Moves one batch forward, a tick at a time, while it holds the batch's lease."""

    def __init__(self, st: FerryState, batch_id: str, runner_id: str) -> None:
        self.st = st
        self.redis = st.redis
        self.id = batch_id
        self._looked_at = float("-inf")
        self._renewed_at = float("-inf")
        self.runner_id = runner_id
        self.all_queued = False  # every line has gone to the queue

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
                continue  # its first lines go to the queue at once
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
                    continue  # its results are written at once
            await asyncio.sleep(END_TICK_S if self.all_queued else TICK_S)

    async def _renew(self) -> bool:
        """Whether this runner still holds the batch's lease, renewed every `RENEW_S` (another
        runner takes it only once it has run out)."""
        if time.monotonic() - self._renewed_at < RENEW_S:
            return True
        lease = self.key("lease")
        if await self.redis.get(lease) != self.runner_id.encode():
            return False
        await self.redis.expire(lease, LEASE_S)
        self._renewed_at = time.monotonic()
        return True

    async def _update(self, when: set[str] | None = None, **changes: Any) -> Batch | None:
        return await store.update(self.redis, Batch, self.id, when, **changes)

    # Validation: the whole file, before anything runs

    async def _validate(self, batch: Batch) -> None:
        settings = self.st.settings
        try:
            found = await asyncio.to_thread(
                read_lines, file_store(settings).chunks(batch.input_file_id), batch.endpoint,
                settings.batch_max_lines)
        except Exception as e:  # gone from the store, or the store unreachable
            found = [], [line_error("file_unreadable", None, f"The input file cannot be read: {e}")]
        entries, errors = found
        for model, line in first_of_each_model(entries):
            try:
                await models.get_or_bundled(self.redis, model or settings.default_model,
                                            settings.models_path, embeds=embeds(batch.endpoint))
            except NotFound:
                errors.append(line_error("model_not_found", line, f"No model '{model}'",
                                         "body.model"))
            except FerryError as e:  # a model of the other kind (embedding, or generating)
                errors.append(line_error(e.code or "invalid_request", line, e.message, "body.model"))
        if not entries and not errors:
            errors.append(line_error("empty_file", None, "The input file has no requests"))
        if errors:
            await self._update({"validating"}, status="failed", failed_at=int(time.time()),
                               errors={"object": "list", "data": errors[:MAX_ERRORS]})
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key("input"), self.key("next"), self.key("running"),
                        self.key("results"), self.key("ended"))
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
        room: dict[str, int] = {}  # places left in each model's window
        while sent < total:
            entry = orjson.loads(await self.redis.hget(self.key("input"), str(sent)))
            model = (entry["body"].get("model") or self.st.settings.default_model)
            if model not in room:
                room[model] = (await self._window(model)
                               - await self.redis.scard(keys.batch_lines(model)))
            if room[model] <= 0:
                break
            await self._start(batch, sent, entry, attempt=0)
            room[model] -= 1
            sent += 1
        self.all_queued = sent >= total
        return self.all_queued and not await self.redis.hlen(self.key("running"))

    async def _window(self, model: str) -> int:
        # Every sequence, and as many again waiting in the worker's engine and in Redis, so no
        # line waits for this loop's tick; the worker runs interactive jobs first (`Scheduler`).
        # No more than the queue takes (`FERRY_QUEUE_LIMIT`): a line refused would run again.
        sequences = [next(m.batch_slots for m in w.models if m.id == model)
                     for w in await liveness.live_workers(self.redis, model)]
        window = 2 * sum(s or self.st.settings.sequences for s in sequences)
        return max(1, min(window, self.st.settings.queue_limit))

    async def _start(self, batch: Batch, line: int, entry: dict[str, Any], attempt: int) -> None:
        """Record the line as running, then queue its job (a crash in between leaves a running
        line with no job, which `_collect` finds lost and queues again)."""
        try:
            request = request_of(batch.endpoint, entry["body"])
            record = await models.get_or_bundled(
                self.redis, request.model or self.st.settings.default_model,
                self.st.settings.models_path, embeds=embeds(batch.endpoint))
            job = job_of(request, record)
        except (ValidationError, FerryError) as e:
            error = invalid(e) if isinstance(e, ValidationError) else e
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.key("results"), str(line), result_line(entry, error.status,
                                                                      error.to_dict(), ok=False))
                pipe.hdel(self.key("running"), str(line))
                if attempt == 0:
                    pipe.set(self.key("next"), line + 1)
                await pipe.execute()
            await self._count(failed=1)
            return
        job.id, job.background, job.notify = f"{self.id}-{line}-{attempt}", True, self.key("ended")
        meta = JobMeta(id=job.id, kind=job.kind, model=record.id, created=int(time.time()),
                       choices=job.choice_count)
        # what _finish renders with
        running = {**meta.model_dump(), "attempt": attempt, "endpoint": batch.endpoint}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key("running"), str(line), orjson.dumps(running).decode())
            pipe.sadd(keys.batch_lines(record.id), job.id)
            if attempt == 0:
                pipe.set(self.key("next"), line + 1)
            await pipe.execute()
        try:
            await submit(self.redis, job, meta, self.st.settings)
        except FerryError as e:  # queue full, no worker yet: it goes again from `_collect`
            log.info("batch %s line %d not queued yet: %s", self.id, line, e.message)

    async def _collect(self, batch: Batch) -> None:
        """Write the results of the lines whose workers said they ended (`job.notify`: one round
        trip finds them). Every `LOOK_S` look at every running line too: one that ended unsaid
        is collected, one whose job was lost runs again. Looking at every line at every tick
        made most of a batch's Redis commands, and the web process's work takes the CPU from
        the workers' decoding where both share a machine."""
        said = {j.decode() for j in await self.redis.lpop(self.key("ended"), 10_000) or []}
        look = time.monotonic() - self._looked_at >= LOOK_S
        if not said and not look:
            return
        if look:
            self._looked_at = time.monotonic()
        running_lines = [(int(k), orjson.loads(v))
                         for k, v in (await self.redis.hgetall(self.key("running"))).items()]
        if not look:
            running_lines = [(line, r) for line, r in running_lines if r["id"] in said]
        done = await ended(self.redis, [r["id"] for _, r in running_lines])
        for (line, running), finished in zip(running_lines, done, strict=True):
            if finished:
                await self._finish(line, running)
            # Lost: its worker died under it (even before recording itself as the owner), or it
            # is not queued (it never got there, or arq dropped it as orphaned): it never ends.
            elif look and await job_lost(self.redis, running["id"], self.st.settings,
                                         model=running["model"]):
                log.warning("batch %s: job %s was lost; running line %d again", self.id,
                            running["id"], line)
                await withdraw(self.redis, running["id"], running["model"], self.st.settings)
                await self.redis.srem(keys.batch_lines(running["model"]), running["id"])
                entry = orjson.loads(await self.redis.hget(self.key("input"), str(line)))
                await self._start(batch, line, entry, running["attempt"] + 1)

    async def _finish(self, line: int, running: dict[str, Any]) -> None:
        meta = JobMeta.model_validate(running)
        messages = await read_all(self.redis, meta.id)
        end = messages[-1]
        entry = orjson.loads(await self.redis.hget(self.key("input"), str(line)))
        if isinstance(end, Final):
            body = answer(running.get("endpoint", "/v1/chat/completions"), entry["body"], meta,
                          [m for m in messages if isinstance(m, Delta)], end)
            result, ok = result_line(entry, 200, body, ok=True), True
        else:
            assert isinstance(end, Error)
            error = end.exception()
            result, ok = result_line(entry, end.status, error.to_dict(), ok=False), False
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
        usage_totals = dict(batch.usage)
        if usage is not None:
            usage_totals["input_tokens"] += usage.prompt_tokens
            usage_totals["output_tokens"] += usage.completion_tokens
            usage_totals["total_tokens"] += usage.total_tokens
            usage_totals["input_tokens_details"] = {
                "cached_tokens": usage_totals["input_tokens_details"]["cached_tokens"]
                + usage.cached_tokens}
        await self._update(None, request_counts=counts, usage=usage_totals)

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
            elif await job_state(self.redis, job, settings, model) is JobState.RUNNING:
                # Running: it stops at its next token, and is collected once it has.
                await request_cancel(self.redis, job, settings)
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
        counts, usage = totals(batch, results.values())
        if status == "expired":
            for line in range(batch.request_counts.total):
                if line not in results:
                    entry = orjson.loads(await self.redis.hget(self.key("input"), str(line)))
                    error = InvalidRequest("The batch expired before this request ran",
                                           code="batch_expired")
                    results[line] = orjson.loads(result_line(entry, 400, error.to_dict(),
                                                             ok=False))
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
            pipe.delete(*(self.key(p) for p in ("input", "next", "running", "results", "ended",
                                                "lease")))
            pipe.srem(keys.BATCHES, self.id)
            await pipe.execute()
