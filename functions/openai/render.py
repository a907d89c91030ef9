"""Turn a job's messages into OpenAI's response objects: chunks for streams, one object otherwise."""

from __future__ import annotations

from typing import Any

from functions.queue.reader import JobMeta
from shared.jobs import Delta, Logprobs, ToolCallDelta, Usage, add_tool_call


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _chat_logprobs(lp: Logprobs) -> list[dict[str, Any]]:
    return [
        {
            "token": token,
            "logprob": logprob,
            "bytes": list(token.encode()),
            "top_logprobs": [
                {"token": t, "logprob": v, "bytes": list(t.encode())}
                for t, v in (top or {}).items()
            ],
        }
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True)
    ]


class Renderer:
    """Renders one job as chat or text completion objects."""

    def __init__(self, meta: JobMeta) -> None:
        self.meta = meta
        self.chat = meta.kind == "chat"
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        self.id = prefix + meta.id
        self.object = "chat.completion" if self.chat else "text_completion"
        self._started: set[int] = set()

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {
            "id": self.id,
            "object": obj,
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.meta.include_usage:
            out["usage"] = None
        return out

    # Streams

    def chunk(self, delta: Delta) -> dict[str, Any]:
        if not self.chat:
            choice = {
                "index": delta.index,
                "text": delta.text,
                "logprobs": delta.logprobs.model_dump() if delta.logprobs else None,
                "finish_reason": delta.finish_reason,
            }
            return self._envelope("text_completion", [choice])
        body: dict[str, Any] = {}
        if delta.index not in self._started:
            self._started.add(delta.index)
            body["role"] = "assistant"
        if delta.tool_call is not None:
            if "role" in body:
                body["content"] = None
            body["tool_calls"] = [_tool_call_chunk(delta.tool_call)]
        elif delta.text or "role" in body:
            body["content"] = delta.text
        choice = {
            "index": delta.index,
            "delta": body,
            "logprobs": {"content": _chat_logprobs(delta.logprobs), "refusal": None}
            if delta.logprobs else None,
            "finish_reason": delta.finish_reason,
        }
        return self._envelope("chat.completion.chunk", [choice])

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        out["usage"] = _usage(usage)
        return out

    # Whole responses

    def response(self, deltas: list[Delta], usage: Usage, choice_count: int) -> dict[str, Any]:
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
        choices = []
        for i in range(choice_count):
            merged = _merge(logprobs[i])
            if self.chat:
                message: dict[str, Any] = {
                    "role": "assistant", "content": texts[i] or (None if calls[i] else ""),
                    "refusal": None}
                if calls[i]:
                    message["tool_calls"] = calls[i]
                choices.append({
                    "index": i,
                    "message": message,
                    "logprobs": {"content": _chat_logprobs(merged), "refusal": None}
                    if merged else None,
                    "finish_reason": finish[i] or "stop",
                })
            else:
                choices.append({
                    "index": i,
                    "text": texts[i],
                    "logprobs": merged.model_dump() if merged else None,
                    "finish_reason": finish[i] or "stop",
                })
        out = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        out["usage"] = _usage(usage)
        return out


def _tool_call_chunk(tc: ToolCallDelta) -> dict[str, Any]:
    """A call's first chunk names it (arguments empty); the later ones carry arguments only."""
    if tc.id is not None:
        return {"index": tc.index, "id": tc.id, "type": "function",
                "function": {"name": tc.name, "arguments": tc.arguments}}
    return {"index": tc.index, "function": {"arguments": tc.arguments}}


def _merge(parts: list[Logprobs] | None) -> Logprobs | None:
    if not parts:
        return None
    return Logprobs(
        tokens=[t for p in parts for t in p.tokens],
        token_logprobs=[t for p in parts for t in p.token_logprobs],
        top_logprobs=[t for p in parts for t in p.top_logprobs],
        text_offset=[t for p in parts for t in p.text_offset],
    )
