"""A job's messages as Anthropic's: the message object, and the events of its stream.

`MessageEvents` is fed the job's deltas in order: `message_start` (empty content, the prompt's
usage, which the job's first delta carries), then per content block `content_block_start`,
`content_block_delta` (`text_delta` or `input_json_delta`) and `content_block_stop`, with indices
in order and one block open at a time, then `message_delta` (stop reason, output usage) and
`message_stop`.
"""

from __future__ import annotations

import json
from typing import Any

from shared import jobs
from shared.jobs import Delta

Event = dict[str, Any]


def usage(u: jobs.Usage) -> dict[str, int]:
    """Counted as Anthropic counts: `input_tokens` leaves out what was read from the cache."""
    return {"input_tokens": u.prompt_tokens - u.cached_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached_tokens,
            "output_tokens": u.completion_tokens}


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


class MessageEvents:
    def __init__(self, job_id: str, model: str, stop_sequences: list[str]) -> None:
        self.id = f"msg_{job_id}"
        self.model = model
        self.stop_sequences = stop_sequences
        self.content: list[dict[str, Any]] = []
        self.open = False
        self.args: list[str] = []  # each tool_use block's arguments as JSON text, so far
        self.finish: str | None = None
        self.matched: str | None = None
        self.started = False

    def message(self, stop_reason: str | None, stop_sequence: str | None,
                u: dict[str, int]) -> dict[str, Any]:
        content = [dict(b) for b in self.content]
        for block, raw in zip([b for b in content if b["type"] == "tool_use"], self.args,
                              strict=True):
            block["input"] = _parse(raw)
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": u}

    def start(self, u: jobs.Usage) -> list[Event]:
        self.started = True
        first = self.message(None, None, usage(u))
        first["content"] = []
        return [{"type": "message_start", "message": first}, {"type": "ping"}]

    def feed(self, delta: Delta) -> list[Event]:
        events: list[Event] = []
        if not self.started:
            events += self.start(delta.usage or jobs.Usage())
        if delta.finish_reason:
            self.finish, self.matched = delta.finish_reason, delta.stop_sequence
        if delta.tool_call is not None:
            tc = delta.tool_call
            if tc.id is not None:
                events += self._open({"type": "tool_use", "id": tool_use_id(tc.id),
                                      "name": tc.name, "input": {}})
                self.args.append("")
            if tc.arguments:
                self.args[-1] += tc.arguments
                events.append(self._delta({"type": "input_json_delta",
                                           "partial_json": tc.arguments}))
        elif delta.text:
            if not self.open or self.content[-1]["type"] != "text":
                events += self._open({"type": "text", "text": ""})
            self.content[-1]["text"] += delta.text
            events.append(self._delta({"type": "text_delta", "text": delta.text}))
        return events

    def end(self, u: jobs.Usage) -> list[Event]:
        events = [] if self.started else self.start(u)
        events += self._close()
        reason, sequence = self.stop_reason()
        out = usage(u)
        return [*events, {"type": "message_delta",
                          "delta": {"stop_reason": reason, "stop_sequence": sequence},
                          "usage": out}, {"type": "message_stop"}]

    def stop_reason(self) -> tuple[str, str | None]:
        if any(b["type"] == "tool_use" for b in self.content) and self.finish != "length":
            return "tool_use", None
        if self.finish == "length":
            return "max_tokens", None
        if self.matched is not None and self.matched in self.stop_sequences:
            return "stop_sequence", self.matched
        return "end_turn", None

    def whole(self, u: jobs.Usage) -> dict[str, Any]:
        reason, sequence = self.stop_reason()
        return self.message(reason, sequence, usage(u))

    def _open(self, block: dict[str, Any]) -> list[Event]:
        events = self._close()
        self.content.append(block)
        self.open = True
        return [*events, {"type": "content_block_start", "index": len(self.content) - 1,
                          "content_block": dict(block)}]

    def _delta(self, delta: dict[str, Any]) -> Event:
        return {"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta}

    def _close(self) -> list[Event]:
        if not self.open:
            return []
        self.open = False
        return [{"type": "content_block_stop", "index": len(self.content) - 1}]


def _parse(raw: str) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}  # cut short by max_tokens: the call's input never closed
