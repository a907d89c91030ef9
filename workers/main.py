"""A long-lived worker process: one device (a GPU or the CPU) and the models loaded on it.

It registers with a heartbeat, loads the models it was started with, then takes commands from
its control list (``keys.control``): load a model (unloading the ones a handler chose to evict)
or unload one. Each loaded model has a `ModelConsumer` taking that model's queue. With
``keep_alive_s`` set, a model left idle that long is unloaded on its own. SIGTERM (or Ctrl-C)
drains it: no new jobs, the ones in flight finish within ``drain_s``, then it unregisters and
exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import redis
from arq.connections import ArqRedis

from shared import keys
from shared.errors import FerryError, InsufficientMemory, NotFound, Unavailable, WireError
from shared.fleet import liveness
from shared.fleet.control import Command, CommandResult
from shared.fleet.liveness import ModelUsage, WorkerInfo
from shared.redis import client, connect
from shared.registry import models
from shared.registry.models import ModelRecord
from shared.settings import Settings
from workers.engine import backend
from workers.publish import Publisher

if TYPE_CHECKING:
    from workers.consumer import ModelConsumer

log = logging.getLogger(__name__)

CONTROL_WAIT_S = 1  # longest the control loop blocks before looking for idle models


class WorkerProcess:
    def __init__(self, settings: Settings, gpu: int | None = None, cpu: bool = False) -> None:
        if settings.redis_url is None:
            raise SystemExit("REDIS_URL is not set: `ferry worker` needs a Redis (or `ferry serve`)")
        self.settings = settings
        self.url: str = settings.redis_url
        self.gpu, self.cpu = gpu, cpu
        device = "cpu" if cpu else f"gpu:{gpu}" if gpu is not None else "auto"
        self.info = WorkerInfo(
            id=uuid.uuid4().hex[:12], pid=os.getpid(), device=device,
            capacity=settings.worker_memory or _device_memory(gpu, cpu),
            max_models=settings.max_loaded_models, backend=backend.describe(),
        )
        self.consumers: dict[str, ModelConsumer] = {}

    def run(self, preload: list[str]) -> None:
        asyncio.run(self._main(preload))

    async def _main(self, preload: list[str]) -> None:
        self.redis: ArqRedis = await connect(self.url)
        self.stream_client = client(self.url)
        self.publisher = Publisher(self.stream_client, self.settings.stream_ttl_s,
                                   self.settings.stream_interval_ms / 1000,
                                   self.settings.redis_outage_s)
        stop, hurry = asyncio.Event(), asyncio.Event()  # a first signal drains, a second hurries
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: (hurry if stop.is_set() else stop).set())
        await liveness.beat(self.redis, self.info, self.settings.heartbeat_ttl_s)
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            for spec in preload:
                await self.load(spec)
            log.info("worker %s on %s (llama.cpp build: %s) ready: %s (capacity %d MiB, at most "
                     "%d models)", self.info.id, self.info.device, self.info.backend,
                     self.info.model_ids or "no models yet",
                     self.info.capacity >> 20, self.info.max_models)
            control = asyncio.create_task(self._control())
            await asyncio.wait([control, asyncio.create_task(stop.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            control.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control
        finally:
            await self.drain(hurry)
            heartbeat.cancel()
            await liveness.leave(self.redis, self.info)
            await self.redis.aclose()
            self.publisher.close()
            self.stream_client.close()

    async def load(self, spec: str, evict: Sequence[str] = ()) -> str:
        """Load a model (an id, or a path for the command line); returns its id."""
        from workers.consumer import ModelConsumer
        from workers.engine.embedder import Embedder
        from workers.engine.engine import Engine
        from workers.loaded_model import LoadedModel

        for model in evict:
            await self.unload(model)
        record = await self._resolve(spec)
        if record.id in self.consumers:
            return record.id
        need = models.need_bytes(record, self.settings.ctx_len, self.settings.n_batch,
                                 self.settings.sequences)
        if need > self.info.capacity:
            raise InsufficientMemory(f"Model '{record.id}' needs about {need >> 20} MiB; this "
                                     f"worker has {self.info.capacity >> 20} MiB")
        if len(self.consumers) >= self.info.max_models or self.info.used + need > self.info.capacity:
            raise Unavailable(f"No room for '{record.id}' on worker {self.info.id}",
                              code="workers_busy")
        log.info("loading %s from %s", record.id, record.path)
        gpu, one_gpu = not self.cpu, self.gpu is not None
        engine = await asyncio.to_thread(Embedder.load, record, self.settings, gpu, one_gpu) \
            if record.embeds else await asyncio.to_thread(Engine.load, record, self.settings, gpu,
                                                          one_gpu, self.publisher.post)
        record.ctx_len = engine.n_ctx
        usage = ModelUsage(id=record.id, need=need, last_used=time.time(), slots=engine.capacity,
                           batch_slots=engine.batch_capacity)
        self.consumers[record.id] = ModelConsumer(LoadedModel(
            settings=self.settings, redis=self.redis, engine=engine,
            publisher=self.publisher, worker_id=self.info.id, usage=usage,
        ), self.url)
        self.info.models.append(usage)
        await models.register_loaded(self.redis, record)
        await liveness.beat(self.redis, self.info, self.settings.heartbeat_ttl_s)
        log.info("serving %s (about %d MiB)", record.id, need >> 20)
        return record.id

    async def unload(self, model: str) -> None:
        consumer = self.consumers.pop(model, None)
        if consumer is None:
            return
        await liveness.drop(self.redis, self.info, model, self.settings.heartbeat_ttl_s)
        await consumer.close()
        log.info("unloaded %s", model)

    async def drain(self, hurry: asyncio.Event) -> None:
        """Stop taking jobs and models; let the jobs in flight finish for up to `drain_s` (or
        until `hurry`), end the rest with `worker_stopping`, then free every model.

        A job arq has taken is never put back, so none runs twice: it either finishes here or
        its client hears `worker_stopping` and may send it again, to a worker still serving.
        """
        self.info.draining = True
        consumers = list(self.consumers.values())
        for consumer in consumers:
            consumer.stop_taking()
        with contextlib.suppress(redis.RedisError, OSError):  # Redis away: the jobs still end
            for model in list(self.consumers):  # handlers route new jobs to other workers at once
                await liveness.drop(self.redis, self.info, model, self.settings.heartbeat_ttl_s)
        if busy := sum(c.in_flight for c in consumers):
            log.info("draining: %d jobs in flight, waiting up to %.0fs", busy, self.settings.drain_s)
        deadline = time.monotonic() + self.settings.drain_s
        while any(c.in_flight for c in consumers) and time.monotonic() < deadline and not hurry.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(hurry.wait(), 0.05)
        if left := sum(c.in_flight for c in consumers):
            log.warning("ending %d jobs in flight with worker_stopping", left)
            for consumer in consumers:
                consumer.end_jobs()
        for model in list(self.consumers):
            await self.unload(model)

    async def _resolve(self, spec: str) -> ModelRecord:
        """A bundled id, a folder under the models folder, a .gguf path, or a registered model."""
        try:
            return await asyncio.to_thread(models.resolve, spec, self.settings.models_path)
        except NotFound:
            record = await models.get(self.redis, spec)
            if not record.path or not Path(record.path).is_file():
                raise NotFound(f"Model '{spec}' has no file on worker {self.info.id}") from None
            return record

    async def _control(self) -> None:
        while True:
            try:
                got = await self.redis.blpop([keys.control(self.info.id)], timeout=CONTROL_WAIT_S)
            except (redis.RedisError, OSError):  # Redis restarting: the models stay loaded
                log.warning("control list unreachable; retrying", exc_info=True)
                await asyncio.sleep(CONTROL_WAIT_S)
                continue
            if got is not None:
                await self._obey(Command.model_validate_json(got[1]))
            elif self.settings.keep_alive_s:
                await self._unload_idle()
            for consumer in self.consumers.values():
                consumer.revive()

    async def _obey(self, command: Command) -> None:
        try:
            if command.op == "load":
                await self.load(command.model, command.evict)
            else:
                await self.unload(command.model)
            result = CommandResult()
        except FerryError as e:
            e.param = e.param or "model"
            result = CommandResult(error=WireError.of(e))
        except Exception as e:  # a model llama.cpp cannot load, say: tell the caller, keep serving
            log.exception("%s %s failed", command.op, command.model)
            result = CommandResult(error=WireError.of(FerryError(f"{command.op} failed: {e}",
                                                                 param="model")))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(command.reply_to, result.model_dump_json())
            pipe.expire(command.reply_to, 60)
            await pipe.execute()

    async def _unload_idle(self) -> None:
        now = time.time()
        for usage in list(self.info.models):
            idle = usage.jobs_in_flight == 0 and now - usage.last_used > self.settings.keep_alive_s
            if idle and not await self.redis.zcard(keys.queue(usage.id)):
                log.info("%s idle for %.0fs; unloading it", usage.id, now - usage.last_used)
                await self.unload(usage.id)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await liveness.beat(self.redis, self.info, self.settings.heartbeat_ttl_s)
                for consumer in list(self.consumers.values()):
                    await consumer.publish_cache_map()
            except Exception:  # a blip in Redis must not kill the worker; the next beat retries
                log.warning("heartbeat failed", exc_info=True)


def _device_memory(gpu: int | None, cpu: bool) -> int:
    """Total bytes of the GPU (from nvidia-smi) or, on the CPU, of the host or the container."""
    if not cpu and (smi := shutil.which("nvidia-smi")):
        with contextlib.suppress(subprocess.SubprocessError, OSError, ValueError):
            out = subprocess.run(
                [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits",
                 "-i", str(gpu or 0)], capture_output=True, text=True, timeout=10, check=True)
            return int(out.stdout.split()[0]) * 2**20
    host = liveness.host_memory()[0]
    return min(host, _container_memory() or host)


def _container_memory() -> int | None:
    """The container's memory limit (cgroup v2, else v1), where one is set: /proc/meminfo shows
    the whole node's."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):  # no such file; "max": no limit
            return int(Path(path).read_text())
    return None


def run(settings: Settings, models_to_load: list[str], gpu: int | None, cpu: bool) -> None:
    if gpu is not None:
        # Must happen before llama.cpp initialises CUDA, i.e. before the engine is imported.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        if not backend.offloads():  # it would run on the CPU, sized by the GPU's memory
            raise SystemExit(
                f"--gpu {gpu}: this llama-cpp-python is a CPU-only build, so nothing would run "
                "on the GPU. Rebuild it with CUDA (`make install CUDA=1`, or pip with "
                "CMAKE_ARGS=-DGGML_CUDA=on), or start the worker with --cpu.")
    WorkerProcess(settings, gpu, cpu).run(models_to_load)
