"""A job turned into what the scheduler runs: per prompt, its tokens and one sampler chain per
choice.

This runs before the scheduler sees the job (off the event loop, not on the scheduler thread), so
bad input fails fast, as a `FerryError` before any message: a model with no chat template, a
template that refuses the messages, a prompt longer than the context, a logit bias out of range,
a schema that cannot become a grammar.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jinja2
from llama_cpp._internals import LlamaModel

from shared.errors import ContextLengthExceeded, InvalidRequest
from shared.jobs import GenerationJob
from shared.registry.models import ModelRecord
from workers.chat import template, tool_prompt
from workers.chat.tool_parse import ToolStream
from workers.engine import sampling
from workers.engine.choice import Choice
from workers.engine.task import Group
from workers.engine.textstream import TextStream


@dataclass
class Prompt:
    index: int  # first choice index this prompt answers
    tokens: list[int]
    stop: list[str]
    tools: tool_prompt.Plan | None = None


class PromptBuilder:
    """One model's way from a job to the scheduler's groups.

    `n_ctx`: the context a sequence may fill; `width`: the sequences interactive jobs may hold
    (`FERRY_PARALLEL`), the most choices one group may hold; `eog`: the end-of-generation
    tokens, asked for only with `ignore_eos`; `cap`: the server's limit on tokens generated per
    request (`FERRY_MAX_TOKENS`), if any.
    """

    def __init__(self, model: LlamaModel, record: ModelRecord, n_ctx: int, width: int,
                 eog: Callable[[], list[int]], cap: int | None = None) -> None:
        self.model = model
        self.cap = cap
        self.model_id = record.id
        self.n_ctx = n_ctx
        self.n_vocab = model.n_vocab()
        self.width = width
        self.eog = eog
        self.tool_family = None if record.chat_format else tool_prompt.family(
            model.metadata().get("tokenizer.chat_template"))
        self.formatter = template.chat_formatter(model, record.chat_format)

    def groups(self, job: GenerationJob) -> list[Group]:
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
        if s.ignore_eos and grammar is not None:
            # A grammar that has matched allows only the end, which ignore_eos bans: llama.cpp
            # would pick a token the grammar rejects and abort the worker.
            raise InvalidRequest("ignore_eos cannot be used with JSON output or tools, which "
                                 "must end where their grammar ends", param="ignore_eos")
        if s.ignore_eos:
            bias.update({t: float("-inf") for t in self.eog()})
        groups = []
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
            groups += [Group(p.tokens, choices[k:k + self.width], self.limit(job))
                       for k in range(0, len(choices), self.width)]
        return groups

    def limit(self, job: GenerationJob) -> int | None:
        """Tokens a choice may generate: the request's limit, held to the server's cap."""
        asked = job.sampling.max_tokens
        return asked if self.cap is None else min(asked or self.cap, self.cap)

    def prompt_tokens(self, job: GenerationJob) -> int:
        """What the job's prompt comes to, as its usage would count it (a count-only job), even
        past the context."""
        if job.kind == "chat" and self.formatter is not None:
            return len(self._chat_prompt(job, job.messages).tokens)
        return len(self._prompts(job)[0].tokens)

    def _prompts(self, job: GenerationJob) -> list[Prompt]:
        if job.kind == "chat":
            if self.formatter is None:
                raise InvalidRequest(
                    f"Model '{self.model_id}' has no chat template; use /v1/completions",
                    param="model",
                )
            messages = job.messages
            prompts = [self._chat_prompt(job, messages)]
            while job.truncate and self._too_long(len(prompts[0].tokens), job):
                shorter = _drop_oldest_turn(messages)
                if shorter is None:
                    break  # only the last turn is left: it fails the check below
                messages = shorter
                prompts = [self._chat_prompt(job, messages)]
        else:
            prompts = [Prompt(i * job.n, self._prompt_tokens(p), [])
                       for i, p in enumerate(job.prompts)]
        for p in prompts:
            self._check_fits(len(p.tokens), job)
        return prompts

    def _chat_prompt(self, job: GenerationJob, messages: list[dict[str, Any]]) -> Prompt:
        assert self.formatter is not None
        plan = tool_prompt.plan(messages, job.tools, self.tool_family, self._single_token)
        try:
            result = tool_prompt.render(self.formatter, plan)
        except (jinja2.TemplateError, ValueError, TypeError) as e:
            raise InvalidRequest(f"The chat template refused the messages: {e}",
                                 param="messages") from e
        tokens = self.model.tokenize(
            result.prompt.encode(), add_bos=not result.added_special, special=True
        )
        stops = result.stop if isinstance(result.stop, list) else [result.stop or ""]
        return Prompt(0, tokens, [s for s in stops if s], plan)

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

    def _wanted(self, job: GenerationJob) -> int:
        """Room the answer needs: its max_tokens, or one token when that is only a ceiling
        (`clamp`: the context's end stops it, as `length`)."""
        return 1 if job.clamp else job.sampling.max_tokens or 1

    def _too_long(self, prompt_tokens: int, job: GenerationJob) -> bool:
        return prompt_tokens + self._wanted(job) > self.n_ctx

    def _check_fits(self, prompt_tokens: int, job: GenerationJob) -> None:
        wanted = prompt_tokens + self._wanted(job)
        if wanted > self.n_ctx:
            param = "messages" if job.kind == "chat" else "prompt"
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.n_ctx} tokens. However, you "
                f"requested {wanted} tokens ({prompt_tokens} in the {param}, "
                f"{self._wanted(job)} in the completion). Please reduce the length "
                f"of the {param} or the completion.",
                param=param,
            )


def _drop_oldest_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The messages less their oldest turn after the system prompt (a user message and what
    answered it, tool results included), as OpenAI's `truncation: auto` drops input items from
    the start; None when only the last turn is left."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    starts = [i for i in range(head, len(messages)) if messages[i]["role"] == "user"]
    if len(starts) < 2:
        return None
    return messages[:head] + messages[starts[1]:]
