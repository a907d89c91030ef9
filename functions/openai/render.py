"""Turn a job's messages into OpenAI's answer objects (`functions.openai.answers`): a chunk per
delta for streams, one completion otherwise."""

from __future__ import annotations

from typing import Any

from functions.openai import answers as a
from functions.queue.submit import JobMeta
from shared import jobs
from shared.jobs import Delta, Logprobs, ToolCallDelta, add_tool_call


def _usage(usage: jobs.Usage) -> a.Usage:
    return a.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens,
                   prompt_tokens_details=a.PromptTokensDetails(cached_tokens=usage.cached_tokens))


def _chat_logprobs(lp: Logprobs) -> a.ChatLogprobs:
    return a.ChatLogprobs(content=[
        a.TokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()), top_logprobs=[
            a.TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in (top or {}).items()
        ])
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True)
    ], refusal=None)


class Renderer:
    """Renders one job as chat or text completion objects, as JSON-ready dicts."""

    def __init__(self, meta: JobMeta) -> None:
        self.meta = meta
        self.chat = meta.kind == "chat"
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        self.id = prefix + meta.id
        self.object = "chat.completion" if self.chat else "text_completion"
        self._started: set[int] = set()

    def _envelope(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "created": self.meta.created,
                               "model": self.meta.model, "system_fingerprint": None}
        if self.meta.include_usage:
            out["usage"] = None
        return out

    # Streams

    def chunk(self, delta: Delta) -> dict[str, Any]:
        if not self.chat:
            return a.dump(a.TextCompletion(**self._envelope(), object="text_completion", choices=[
                a.TextChoice(index=delta.index, text=delta.text,
                             logprobs=delta.logprobs,
                             finish_reason=delta.finish_reason)]))
        body = a.ChunkDelta()
        if delta.index not in self._started:
            self._started.add(delta.index)
            body.role = "assistant"
        if delta.tool_call is not None:
            if body.role:
                body.content = None
            body.tool_calls = [_tool_call_chunk(delta.tool_call)]
        elif delta.text or body.role:
            body.content = delta.text
        choice = a.ChatChunkChoice(
            index=delta.index, delta=body,
            logprobs=_chat_logprobs(delta.logprobs) if delta.logprobs else None,
            finish_reason=delta.finish_reason)
        return a.dump(a.ChatCompletionChunk(**self._envelope(), object="chat.completion.chunk",
                                            choices=[choice]))

    def usage_chunk(self, usage: jobs.Usage) -> dict[str, Any]:
        envelope = {**self._envelope(), "usage": _usage(usage), "choices": []}
        if self.chat:
            return a.dump(a.ChatCompletionChunk(**envelope, object="chat.completion.chunk"))
        return a.dump(a.TextCompletion(**envelope, object="text_completion"))

    # Whole responses

    def response(self, deltas: list[Delta], usage: jobs.Usage, choice_count: int
                 ) -> dict[str, Any]:
        texts = [""] * choice_count
        finish: list[str | None] = [None] * choice_count
        logprobs: list[list[Logprobs] | None] = [None] * choice_count
        calls: list[list[dict[str, Any]]] = [[] for _ in range(choice_count)]
        for d in deltas:
            texts[d.index] += d.text
            if d.tool_call is not None:
                add_tool_call(calls[d.index], d.tool_call)
            finish[d.index] = d.finish_reason or finish[d.index]
            if d.logprobs:
                logprobs[d.index] = (logprobs[d.index] or []) + [d.logprobs]
        envelope = {**self._envelope(), "usage": _usage(usage)}
        merged = [_merge(lp) for lp in logprobs]
        if self.chat:
            return a.dump(a.ChatCompletion(**envelope, object="chat.completion", choices=[
                a.ChatChoice(index=i, message=_message(texts[i], calls[i]),
                             logprobs=_chat_logprobs(lp) if (lp := merged[i]) else None,
                             finish_reason=finish[i] or "stop")
                for i in range(choice_count)]))
        return a.dump(a.TextCompletion(**envelope, object="text_completion", choices=[
            a.TextChoice(index=i, text=texts[i],
                         logprobs=merged[i],
                         finish_reason=finish[i] or "stop")
            for i in range(choice_count)]))


def _message(text: str, calls: list[dict[str, Any]]) -> a.AssistantMessage:
    message = a.AssistantMessage(role="assistant", content=text or (None if calls else ""),
                                 refusal=None)
    if calls:
        message.tool_calls = [a.ToolCall.model_validate(c) for c in calls]
    return message


def _tool_call_chunk(tc: ToolCallDelta) -> a.ChunkToolCall:
    """A call's first chunk names it (arguments empty); the later ones carry arguments only."""
    if tc.id is not None:
        return a.ChunkToolCall(index=tc.index, id=tc.id, type="function",
                               function=a.ChunkFunction(name=tc.name, arguments=tc.arguments))
    return a.ChunkToolCall(index=tc.index, function=a.ChunkFunction(arguments=tc.arguments))


def _merge(parts: list[Logprobs] | None) -> Logprobs | None:
    if not parts:
        return None
    return Logprobs(
        tokens=[t for p in parts for t in p.tokens],
        token_logprobs=[t for p in parts for t in p.token_logprobs],
        top_logprobs=[t for p in parts for t in p.top_logprobs],
        text_offset=[t for p in parts for t in p.text_offset],
    )
