"""The engine owns one loaded model: its llama.cpp context, and the scheduler that batches jobs.

`run` turns a job into prompt tokens and per-choice sampler chains (here, before the scheduler
sees it, so bad input fails fast), hands it to the scheduler, and waits until the publisher has
put the job's last message in Redis. Many jobs run at once, one sequence per choice.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import jinja2
import llama_cpp
from llama_cpp import _logger as llama_cpp_logger
from llama_cpp import llama_chat_format
from llama_cpp._internals import LlamaContext, LlamaModel

from shared.errors import ContextLengthExceeded, InvalidRequest
from shared.jobs import GenerationJob
from shared.registry.models import ModelRecord
from shared.settings import Settings
from workers.chat import tool_prompt
from workers.chat.tool_parse import ToolStream
from workers.engine import sampling
from workers.engine.scheduler import Choice, Group, Post, Run, Scheduler
from workers.engine.textstream import TextStream
from workers.publish import Answer

log = logging.getLogger(__name__)

# Chat formats llama-cpp-python ships, for GGUFs that carry no template of their own.
NAMED_FORMATS: dict[str, llama_chat_format.ChatFormatter] = {
    "gemma": llama_chat_format.format_gemma,
    "chatml": llama_chat_format.format_chatml,
    "llama-2": llama_chat_format.format_llama2,
    "mistral-instruct": llama_chat_format.format_mistral_instruct,
}


@dataclass
class Prompt:
    index: int  # first choice index this prompt answers
    tokens: list[int]
    stop: list[str]
    tools: tool_prompt.Plan | None = None


class Engine:
    """One model, loaded once; `run` generates a job's choices alongside every other job's."""

    def __init__(self, model: LlamaModel, ctx: LlamaContext, record: ModelRecord,
                 settings: Settings, post: Post) -> None:
        self.model = model
        self.ctx = ctx
        self.record = record
        self.scheduler = Scheduler(model, ctx, settings.ctx_len, post,
                                   host_bytes=settings.cache_ram_mb << 20)
        self.n_ctx = self.scheduler.n_ctx
        self.n_vocab = model.n_vocab()
        self.tool_family = None if record.chat_format else tool_prompt.family(
            model.metadata().get("tokenizer.chat_template"))
        self.formatter = _chat_formatter(model, record.chat_format)

    @classmethod
    def load(cls, record: ModelRecord, settings: Settings, gpu: bool, one_gpu: bool,
             post: Post) -> Engine:
        """`one_gpu`: the process is pinned to one GPU, so keep llama.cpp from splitting layers."""
        llama_cpp.llama_backend_init()
        llama_cpp_logger.set_verbose(False)  # llama.cpp's own log: errors only
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = settings.n_gpu_layers if gpu else 0
        if one_gpu:
            mparams.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
            mparams.main_gpu = 0
        model = LlamaModel(path_model=record.path, params=mparams, verbose=False)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = settings.ctx_len
        cparams.n_batch = cparams.n_ubatch = max(settings.n_batch, settings.parallel)
        cparams.n_seq_max = settings.parallel
        cparams.kv_unified = True  # one cache for all sequences: one prompt may fill it
        cparams.n_threads = cparams.n_threads_batch = settings.n_threads or physical_cores()
        try:
            ctx = LlamaContext(model=model, params=cparams, verbose=False)
        except Exception:
            model.close()
            raise
        return cls(model, ctx, record, settings, post)

    def close(self) -> None:
        self.scheduler.close()
        self.ctx.close()
        self.model.close()

    async def run(self, job: GenerationJob, answer: Answer) -> bool:
        """Generate every choice of `job`, publishing through `answer`; True if it was cancelled
        (the client left, or this task was cancelled: timeout, shutdown). Raises `FerryError`s
        for bad input, before any message."""
        run = Run(answer, await asyncio.to_thread(self._groups, job))
        self.scheduler.submit(run)
        try:
            await asyncio.shield(answer.done)
        finally:
            if not answer.done.done():
                answer.cancelled = True  # the scheduler drops it at its next step
                await asyncio.wait([answer.done])
        if answer.error is not None:
            raise answer.error
        if run.failed:
            raise RuntimeError("llama.cpp failed while decoding")
        return answer.final is None

    @cached_property
    def eog(self) -> list[int]:
        """Every end-of-generation token, for `ignore_eos` (a walk over the vocabulary, done the
        first time a job asks, not at every load)."""
        return [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.model.vocab, t)]

    def _groups(self, job: GenerationJob) -> list[Group]:
        """The job as the scheduler takes it: per prompt, its tokens and one chain per choice."""
        prompts = self._prompts(job)
        s = job.sampling
        plan = prompts[0].tools
        grammar = sampling.schema_grammar(job.json_schema) if job.json_schema is not None \
            else plan.grammar if plan is not None else None
        bias = dict(s.logit_bias)
        if bad := [t for t in bias if not 0 <= t < self.n_vocab]:
            raise InvalidRequest(f"logit_bias has token ids out of range: {bad[:5]}",
                                 param="logit_bias")
        if s.ignore_eos:
            bias.update({t: float("-inf") for t in self.eog})
        groups = []
        width = len(self.scheduler.seqs)
        for p in prompts:
            choices = [
                Choice(
                    index=p.index + j,
                    chain=sampling.chain(self.model, s, bias, grammar,
                                         None if s.seed is None else s.seed + j, p.tokens),
                    text=TextStream([*s.stop, *p.stop]),
                    top_n=job.logprobs,
                    tools=ToolStream(p.tools.format(), p.tools.parallel)
                    if p.tools is not None and p.tools.format is not None else None,
                )
                for j in range(job.n)
            ]
            groups += [Group(p.tokens, choices[k:k + width], s.max_tokens)
                       for k in range(0, len(choices), width)]
        return groups

    def _prompts(self, job: GenerationJob) -> list[Prompt]:
        if job.kind == "chat":
            if self.formatter is None:
                raise InvalidRequest(
                    f"Model '{self.record.id}' has no chat template; use /v1/completions",
                    param="model",
                )
            plan = tool_prompt.plan(job.messages, job.tools, self.tool_family, self._single_token)
            try:
                result = tool_prompt.render(self.formatter, plan)
            except (jinja2.TemplateError, ValueError, TypeError) as e:
                raise InvalidRequest(f"The chat template refused the messages: {e}",
                                     param="messages") from e
            tokens = self.model.tokenize(
                result.prompt.encode(), add_bos=not result.added_special, special=True
            )
            stops = result.stop if isinstance(result.stop, list) else [result.stop or ""]
            prompts = [Prompt(0, tokens, [s for s in stops if s], plan)]
        else:
            prompts = [Prompt(i * job.n, self._prompt_tokens(p), [])
                       for i, p in enumerate(job.prompts)]
        for p in prompts:
            self._check_fits(len(p.tokens), job)
        return prompts

    def _single_token(self, text: str) -> int | None:
        tokens = self.model.tokenize(text.encode(), add_bos=False, special=True)
        return tokens[0] if len(tokens) == 1 else None

    def _prompt_tokens(self, text: str) -> list[int]:
        """An empty prompt starts from BOS, as llama.cpp's server does; llama.cpp needs a token."""
        tokens = self.model.tokenize(text.encode(), add_bos=True, special=True)
        if not tokens and (bos := self.model.token_bos()) >= 0:
            tokens = [bos]
        if not tokens:
            raise InvalidRequest("The prompt is empty and this model has no BOS token to start from",
                                 param="prompt")
        return tokens

    def _check_fits(self, prompt_tokens: int, job: GenerationJob) -> None:
        wanted = prompt_tokens + (job.sampling.max_tokens or 1)
        if wanted > self.n_ctx:
            param = "messages" if job.kind == "chat" else "prompt"
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.n_ctx} tokens. However, you "
                f"requested {wanted} tokens ({prompt_tokens} in the {param}, "
                f"{job.sampling.max_tokens or 1} in the completion). Please reduce the length "
                f"of the {param} or the completion.",
                param=param,
            )


def _chat_formatter(model: LlamaModel, chat_format: str | None
                    ) -> llama_chat_format.ChatFormatter | None:
    """The model's chat template: a named format, else the GGUF's own; None if it has neither."""
    if chat_format is not None:
        return NAMED_FORMATS[chat_format]
    template = model.metadata().get("tokenizer.chat_template")
    if template is None:
        return None
    eos, bos = model.token_eos(), model.token_bos()
    return llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=model.detokenize([eos], special=True).decode(errors="replace"),
        bos_token=model.detokenize([bos], special=True).decode(errors="replace") if bos >= 0 else "",
        stop_token_ids=[eos],
    )


def physical_cores() -> int:
    """The physical cores this process may run on, as llama.cpp's own tools count them."""
    cpus = os.sched_getaffinity(0)
    try:
        cores = {Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text()
                 for c in cpus}
    except OSError:
        return len(cpus)
    return max(len(cores), 1)
