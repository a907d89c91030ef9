"""The engine owns one loaded model and turns jobs into messages.

It runs one generation at a time on its own thread (a `Llama` context is not thread-safe), hands
each token as a `Delta` to a callback on that thread, and stops between tokens when the callback
says the client has gone. A later scheduler that batches many jobs through llama.cpp's batch API
replaces `run` and keeps its contract: a job and a callback in, "stopped early?" out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import jinja2
import llama_cpp
import numpy as np
from llama_cpp import Llama, LlamaGrammar, StoppingCriteriaList, llama_chat_format, llama_grammar

from shared.errors import ContextLengthExceeded, InvalidRequest
from shared.jobs import Delta, Final, GenerationJob, Logprobs, Usage
from shared.models import ModelRecord
from shared.settings import Settings

log = logging.getLogger(__name__)

# Chat formats llama-cpp-python ships, for GGUFs that carry no template of their own.
NAMED_FORMATS: dict[str, llama_chat_format.ChatFormatter] = {
    "gemma": llama_chat_format.format_gemma,
    "chatml": llama_chat_format.format_chatml,
    "llama-2": llama_chat_format.format_llama2,
    "mistral-instruct": llama_chat_format.format_mistral_instruct,
}

Message = Delta | Final
Emit = Callable[[Sequence[Message]], bool]


@dataclass
class Prompt:
    index: int  # first choice index this prompt answers
    tokens: list[int]
    stop: list[str]
    stopping: StoppingCriteriaList | None


class Engine:
    """One model, loaded once; `run` streams a job's messages."""

    def __init__(self, llm: Llama, record: ModelRecord) -> None:
        self.llm = llm
        self.record = record
        # llama.cpp may round the context up (128 -> 256), but llama-cpp-python sizes its logits
        # array by the context asked for: the smaller is the real limit.
        self.n_ctx = min(llm.n_ctx(), llm.context_params.n_ctx)
        self.formatter = _chat_formatter(llm, record.chat_format)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._lock = asyncio.Lock()

    @classmethod
    def load(cls, record: ModelRecord, settings: Settings, gpu: bool, one_gpu: bool) -> Engine:
        """`one_gpu`: the process is pinned to one GPU, so keep llama.cpp from splitting layers."""
        split = {"split_mode": llama_cpp.LLAMA_SPLIT_MODE_NONE, "main_gpu": 0} if one_gpu else {}
        llm = Llama(
            model_path=record.path,
            n_ctx=settings.ctx_len,
            n_batch=settings.n_batch,
            n_threads=settings.n_threads,
            n_gpu_layers=settings.n_gpu_layers if gpu else 0,
            logits_all=settings.logprobs,
            verbose=False,
            **split,  # type: ignore[arg-type]
        )
        return cls(llm, record)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.llm.close()

    async def run(self, job: GenerationJob, emit: Emit) -> bool:
        """Generate every choice of `job`, handing each message to `emit` on the engine thread.

        `emit` returns True when the client has gone; generation then ends at the next token.
        Returns whether it ended that way. Raises `FerryError`s for bad input, before any delta.
        Publishing from the engine thread keeps the event loop (and its share of the GIL) out
        of the token loop.
        """
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        async with self._lock:
            done = loop.run_in_executor(self._thread, self._generate_all, job, emit, stop)
            try:
                return await asyncio.shield(done)
            finally:
                stop.set()  # cancelled (shutdown, timeout): stop the thread, then let go
                await asyncio.wait([done])

    # Below runs on the engine thread.

    def _generate_all(self, job: GenerationJob, emit: Emit, stop: threading.Event) -> bool:
        for message in self._generate(job, stop):
            if emit([message]):
                stop.set()
        return stop.is_set()

    def _generate(self, job: GenerationJob, stop: threading.Event) -> Iterator[Message]:
        prompts = self._prompts(job)
        grammar = _grammar(json.dumps(job.json_schema)) if job.json_schema is not None else None
        s = job.sampling
        bias = dict(s.logit_bias)
        if s.ignore_eos:
            bias[self.llm.token_eos()] = float("-inf")
        usage = Usage()
        for prompt in prompts:
            usage.prompt_tokens += len(prompt.tokens)
            for j in range(job.n):
                counter = _TokenCounter(stop, self.n_ctx)
                stopping = StoppingCriteriaList([counter, *(prompt.stopping or [])])
                chunks = cast(Iterator[Any], self.llm.create_completion(
                    prompt=prompt.tokens,
                    max_tokens=s.max_tokens,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=s.top_k,
                    min_p=s.min_p,
                    stop=[*s.stop, *prompt.stop],
                    frequency_penalty=s.frequency_penalty,
                    presence_penalty=s.presence_penalty,
                    repeat_penalty=s.repeat_penalty,
                    seed=s.seed,
                    logit_bias=bias or None,
                    logprobs=job.logprobs,
                    grammar=grammar,
                    stopping_criteria=stopping,
                    stream=True,
                ))
                for chunk in chunks:
                    if stop.is_set():
                        chunks.close()  # type: ignore[attr-defined]  # a generator
                        return
                    choice = chunk["choices"][0]
                    if counter.full and choice.get("finish_reason"):
                        choice["finish_reason"] = "length"  # the context ran out, not a stop
                    yield _delta(prompt.index + j, choice, job.logprobs or 0)
                usage.completion_tokens += counter.sampled
        yield Final(usage=usage)

    def _prompts(self, job: GenerationJob) -> list[Prompt]:
        if job.kind == "chat":
            if self.formatter is None:
                raise InvalidRequest(
                    f"Model '{self.record.id}' has no chat template; use /v1/completions",
                    param="model",
                )
            try:
                result = self.formatter(messages=cast(Any, job.messages))
            except (jinja2.TemplateError, ValueError) as e:
                raise InvalidRequest(f"The chat template refused the messages: {e}",
                                     param="messages") from e
            tokens = self.llm.tokenize(
                result.prompt.encode(), add_bos=not result.added_special, special=True
            )
            stops = result.stop if isinstance(result.stop, list) else [result.stop or ""]
            prompts = [Prompt(0, tokens, [s for s in stops if s], result.stopping_criteria)]
        else:
            prompts = [Prompt(i * job.n, self._prompt_tokens(p), [], None)
                       for i, p in enumerate(job.prompts)]
        for p in prompts:
            self._check_fits(len(p.tokens), job)
        return prompts

    def _prompt_tokens(self, text: str) -> list[int]:
        """An empty prompt starts from BOS, as llama.cpp's server does; llama.cpp needs a token."""
        tokens = self.llm.tokenize(text.encode(), add_bos=True, special=True)
        if not tokens and (bos := self.llm.token_bos()) >= 0:
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


class _TokenCounter:
    """A stopping criterion that counts sampled tokens and stops when asked to, or when the
    context is full: llama-cpp-python's streaming loop can skip its own max_tokens check (while
    it holds back a partial stop sequence) and then evaluate past the context, and fail.

    llama-cpp-python calls it once per sampled token and once more after the loop.
    """

    def __init__(self, stop: threading.Event, n_ctx: int) -> None:
        self.stop = stop
        self.n_ctx = n_ctx
        self.calls = 0
        self.dropped = 0  # the token sampled when this criterion ended generation is not emitted
        self.full = False

    def __call__(self, input_ids: np.ndarray, logits: np.ndarray) -> bool:
        self.calls += 1
        self.full = self.full or len(input_ids) >= self.n_ctx
        if (self.full or self.stop.is_set()) and not self.dropped:
            self.dropped = 1
        return self.full or self.stop.is_set()

    @property
    def sampled(self) -> int:
        return max(self.calls - 1 - self.dropped, 0)


def _delta(index: int, choice: dict[str, Any], top_n: int) -> Delta:
    """One streamed choice of llama-cpp-python as a `Delta`, logprobs as plain floats."""
    lp = choice.get("logprobs")
    return Delta(
        index=index,
        text=choice["text"],
        finish_reason=choice.get("finish_reason"),
        logprobs=Logprobs(
            tokens=lp["tokens"],
            token_logprobs=[None if v is None else float(v) for v in lp["token_logprobs"]],
            top_logprobs=[
                None if top is None else _top(top, top_n) for top in lp["top_logprobs"]
            ],
            text_offset=lp["text_offset"],
        ) if lp else None,
    )


def _top(alternatives: dict[str, Any], n: int) -> dict[str, float]:
    # llama-cpp-python adds the sampled token to the top list; OpenAI gives exactly the top n.
    best = sorted(alternatives.items(), key=lambda kv: kv[1], reverse=True)[:n]
    return {t: float(v) for t, v in best}


@lru_cache(maxsize=64)
def _grammar(schema_json: str) -> LlamaGrammar:
    """A grammar forcing JSON; `{}` means any object (json_object mode)."""
    try:
        if schema_json == "{}":
            return LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=False)
        return LlamaGrammar.from_json_schema(schema_json, verbose=False)
    except Exception as e:  # llama-cpp-python raises bare ValueError/RuntimeError here
        raise InvalidRequest(
            f"response_format schema cannot be enforced: {e}", param="response_format"
        ) from e


def _chat_formatter(llm: Llama, chat_format: str | None) -> llama_chat_format.ChatFormatter | None:
    """The model's chat template: a named format, else the GGUF's own; None if it has neither."""
    if chat_format is not None:
        return NAMED_FORMATS[chat_format]
    template = llm.metadata.get("tokenizer.chat_template")
    if template is None:
        return None
    eos, bos = llm.token_eos(), llm.token_bos()
    return llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=llm.detokenize([eos], special=True).decode(errors="replace"),
        bos_token=llm.detokenize([bos], special=True).decode(errors="replace") if bos >= 0 else "",
        stop_token_ids=[eos],
    )
