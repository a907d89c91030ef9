"""The engine owns one loaded model: its llama.cpp context, and the scheduler that batches jobs.

`run` turns a job into a task (prompt tokens and per-choice sampler chains, built by
`PromptBuilder` before the scheduler sees it, so bad input fails fast), hands it to the
scheduler, and waits until the publisher has put the job's last message in Redis. Many jobs run
at once, one sequence per choice.
"""

from __future__ import annotations

import asyncio
import logging
import os
from functools import cached_property
from pathlib import Path

import llama_cpp
from llama_cpp import _logger as llama_cpp_logger
from llama_cpp._internals import LlamaContext, LlamaModel

from shared.fleet import cache_map
from shared.jobs import GenerationJob
from shared.registry.models import ModelRecord
from shared.settings import Settings
from workers.engine.prompts import PromptBuilder
from workers.engine.scheduler import Scheduler
from workers.engine.task import Outcome, Post, Task
from workers.publish import JobOutput

log = logging.getLogger(__name__)


class Engine:
    """One model, loaded once; `run` generates a job's choices alongside every other job's."""

    def __init__(self, model: LlamaModel, ctx: LlamaContext, record: ModelRecord,
                 settings: Settings, post: Post) -> None:
        self.model = model
        self.ctx = ctx
        self.record = record
        self.scheduler = Scheduler(model, ctx, settings.ctx_len, post,
                                   host_bytes=settings.cache_ram_mb << 20,
                                   interactive=settings.parallel)
        self.n_ctx = self.scheduler.n_ctx
        self.capacity = self.scheduler.interactive  # interactive jobs worth taking at once
        self.batch_capacity = len(self.scheduler.seqs)  # batch lines, with nothing interactive
        self.n_vocab = model.n_vocab()
        self.prompts = PromptBuilder(model, record, self.n_ctx, self.capacity,
                                     lambda: self.eog, settings.max_tokens)

    @classmethod
    def load(cls, record: ModelRecord, settings: Settings, gpu: bool, one_gpu: bool,
             post: Post) -> Engine:
        model = load_model(record, settings, gpu, one_gpu)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = settings.ctx_len
        cparams.n_batch = cparams.n_ubatch = max(settings.n_batch, settings.sequences)
        cparams.n_seq_max = settings.sequences
        cparams.kv_unified = True  # one cache for all sequences: one prompt may fill it
        cparams.n_threads = cparams.n_threads_batch = settings.n_threads or physical_cores()
        return cls(model, new_context(model, cparams), record, settings, post)

    def close(self) -> None:
        self.scheduler.close()
        self.ctx.close()
        self.model.close()

    async def run(self, job: GenerationJob, output: JobOutput) -> Outcome:
        """Generate every choice of `job`, publishing through `output`; how it ended. CANCELLED:
        the client left, or this task was cancelled (timeout, shutdown). Raises `FerryError`s
        for bad input, before any message, and what publishing to Redis failed with."""
        task = Task(job.id, output, await asyncio.to_thread(self.prompts.groups, job),
                    background=job.background, entries=cache_map.job_entries(job))
        self.scheduler.submit(task)
        try:
            await asyncio.shield(output.done)
        finally:
            if not output.done.done():
                output.cancelled = True  # the scheduler drops it at its next step
                await asyncio.wait([output.done])
        if output.error is not None:
            raise output.error
        assert task.outcome is not None  # set before the scheduler's last post
        if task.outcome is Outcome.FAILED:
            log.error("job %s failed: llama.cpp failed while decoding", job.id)
        return task.outcome

    def cache_entries(self) -> set[str]:
        """What this engine's caches hold, as cache map entries (`shared.fleet.cache_map`)."""
        return self.scheduler.cache_entries()

    @cached_property
    def eog(self) -> list[int]:
        """Every end-of-generation token, for `ignore_eos` (a walk over the vocabulary, done the
        first time a job asks, not at every load)."""
        return [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.model.vocab, t)]


def load_model(record: ModelRecord, settings: Settings, gpu: bool, one_gpu: bool) -> LlamaModel:
    """The model's weights, on the GPU when `gpu`. `one_gpu`: the process is pinned to one GPU,
    so keep llama.cpp from splitting layers."""
    llama_cpp.llama_backend_init()
    llama_cpp_logger.set_verbose(False)  # llama.cpp's own log: errors only
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = settings.n_gpu_layers if gpu else 0
    if one_gpu:
        mparams.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
        mparams.main_gpu = 0
    return LlamaModel(path_model=record.path, params=mparams, verbose=False)


def new_context(model: LlamaModel, cparams: llama_cpp.llama_context_params) -> LlamaContext:
    """A llama.cpp context on `model`; if llama.cpp refuses it, the model is freed too."""
    try:
        return LlamaContext(model=model, params=cparams, verbose=False)
    except Exception:
        model.close()
        raise


def physical_cores() -> int:
    """The physical cores this process may run on, as llama.cpp's own tools count them."""
    cpus = os.sched_getaffinity(0)
    try:
        cores = {Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text()
                 for c in cpus}
    except OSError:
        return len(cpus)
    return max(len(cores), 1)
