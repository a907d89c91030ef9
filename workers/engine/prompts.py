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

    `n_ctx`: the context a sequence may fill; `width`: the context's sequences, the most choices
    one group may hold; `eog`: the end-of-generation tokens, asked for only with `ignore_eos`.
    """

    def __init__(self, model: LlamaModel, record: ModelRecord, n_ctx: int, width: int,
                 eog: Callable[[], list[int]]) -> None:
        self.model = model
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
            groups += [Group(p.tokens, choices[k:k + self.width], s.max_tokens)
                       for k in range(0, len(choices), self.width)]
        return groups

    def _prompts(self, job: GenerationJob) -> list[Prompt]:
        if job.kind == "chat":
            if self.formatter is None:
                raise InvalidRequest(
                    f"Model '{self.model_id}' has no chat template; use /v1/completions",
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
