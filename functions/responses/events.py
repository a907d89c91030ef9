"""A job's messages as a response: its output items, and the events of its stream.

`ResponseEvents` is a state machine fed the job's deltas in order. Every event carries a
`sequence_number` counted from 0, and item ids come from the response's own id, so the same
messages always give the same events: a resumed stream (`starting_after`) replays them from the
start and skips those the client saw. Every `.done` event closes the item its `added` opened.
"""

from __future__ import annotations

import time
from typing import Any

from functions.responses import answers as a
from functions.responses.protocol import function_names
from functions.responses.stored import ResponseRecord
from shared import jobs
from shared.errors import FerryError
from shared.jobs import Delta

Event = dict[str, Any]


def usage(u: jobs.Usage) -> a.ResponseUsage:
    return a.ResponseUsage(
        input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        input_tokens_details=a.InputTokensDetails(cached_tokens=u.cached_tokens))


class ResponseEvents:
    def __init__(self, record: ResponseRecord) -> None:
        self.record = record
        self.names = function_names(record.settings.get("tools") or [])
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: int | None = None  # the output index of the item being written
        self.length = False  # the model stopped at its token limit

    # The stream

    def start(self) -> list[Event]:
        status: a.Status = "queued" if self.record.settings.get("background") else "in_progress"
        return [self._event("response.created", response=self.snapshot(status)),
                self._event("response.in_progress", response=self.snapshot("in_progress"))]

    def feed(self, delta: Delta) -> list[Event]:
        events: list[Event] = []
        if delta.finish_reason == "length":
            self.length = True
        if delta.tool_call is not None:
            tc = delta.tool_call
            if tc.id is not None:
                events += self._close()
                ns, name = self.names.get(tc.name or "", (None, tc.name or ""))
                item: dict[str, Any] = {
                    "id": self._item_id("fc"), "type": "function_call", "status": "in_progress",
                    "call_id": tc.id, "name": name, "arguments": ""}
                if ns:
                    item["namespace"] = ns
                events += self._add(item)
            if tc.arguments and self.open is not None:
                item = self.output[self.open]
                item["arguments"] += tc.arguments
                events.append(self._event("response.function_call_arguments.delta",
                                          item_id=item["id"], output_index=self.open,
                                          delta=tc.arguments))
        elif delta.text:
            if self.open is None or self.output[self.open]["type"] != "message":
                events += self._close()
                events += self._open_message()
            assert self.open is not None
            item = self.output[self.open]
            item["content"][0]["text"] += delta.text
            events.append(self._event("response.output_text.delta", item_id=item["id"],
                                      output_index=self.open, content_index=0, delta=delta.text,
                                      logprobs=[]))
        return events

    def finish(self, u: jobs.Usage) -> list[Event]:
        """The job ended well: close what is open, then `completed` or `incomplete`."""
        events = [] if self.output else self._open_message()  # an empty answer is one message
        events += self._close()
        response = self.snapshot("incomplete" if self.length else "completed", u)
        kind = "response.incomplete" if self.length else "response.completed"
        return [*events, self._event(kind, response=response)]

    def fail(self, error: FerryError) -> list[Event]:
        """The job failed or was cancelled: `response.failed` (there is no cancelled event;
        the response inside says `cancelled`)."""
        events = self._close(status="incomplete")
        return [*events, self._event("response.failed", response=self.snapshot(*ending(error)))]

    # The object

    def snapshot(self, status: a.Status, u: jobs.Usage | None = None,
                 error: a.ResponseError | None = None) -> dict[str, Any]:
        s = self.record.settings
        done = status in ("completed", "incomplete", "failed", "cancelled")
        response = a.Response(
            id=self.record.id, created_at=self.record.created_at, status=status,
            completed_at=int(time.time()) if status == "completed" else None,
            background=s.get("background", False), error=error,
            incomplete_details=a.IncompleteDetails(reason="max_output_tokens")
            if status == "incomplete" else None,
            instructions=s.get("instructions"), max_output_tokens=s.get("max_output_tokens"),
            model=self.record.model, output=[_item(i) for i in self.output] if done or
            status == "in_progress" else [],
            parallel_tool_calls=s.get("parallel_tool_calls", True),
            previous_response_id=s.get("previous_response_id"),
            prompt_cache_key=s.get("prompt_cache_key"),
            reasoning=a.Reasoning(**(s.get("reasoning") or {})), store=s.get("store", True),
            temperature=s.get("temperature", 1.0), text=s.get("text") or {"format": {"type": "text"}},
            tool_choice=s.get("tool_choice", "auto"), tools=s.get("tools") or [],
            top_p=s.get("top_p", 1.0), truncation=s.get("truncation", "disabled"),
            usage=usage(u) if u is not None else None, user=s.get("user"),
            metadata=s.get("metadata") or {},
        )
        return response.model_dump(exclude_none=False)

    # Items

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self.record.job_id}{len(self.output):03d}"

    def _add(self, item: dict[str, Any]) -> list[Event]:
        self.output.append(item)
        self.open = len(self.output) - 1
        return [self._event("response.output_item.added", output_index=self.open,
                            item=_item(item))]

    def _open_message(self) -> list[Event]:
        events = self._add({"id": self._item_id("msg"), "type": "message",
                            "status": "in_progress", "role": "assistant",
                            "content": [{"type": "output_text", "text": "", "annotations": [],
                                         "logprobs": []}]})
        item = self.output[-1]
        return [*events, self._event("response.content_part.added", item_id=item["id"],
                                     output_index=self.open, content_index=0,
                                     part={"type": "output_text", "text": "", "annotations": [],
                                           "logprobs": []})]

    def _close(self, status: str | None = None) -> list[Event]:
        if self.open is None:
            return []
        index, item = self.open, self.output[self.open]
        self.open = None
        item["status"] = status or ("incomplete" if self.length else "completed")
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events += [
                self._event("response.output_text.done", item_id=item["id"], output_index=index,
                            content_index=0, text=part["text"], logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"],
                            output_index=index, content_index=0, part=dict(part)),
            ]
        else:
            events.append(self._event("response.function_call_arguments.done",
                                      item_id=item["id"], output_index=index,
                                      name=item["name"], arguments=item["arguments"]))
        return [*events, self._event("response.output_item.done", output_index=index,
                                     item=_item(item))]


def ending(error: FerryError) -> tuple[a.Status, None, a.ResponseError | None]:
    """A failed job's status and error: `cancelled` with none, else `failed` with its error."""
    if error.code == "cancelled" or error.type == "cancelled":
        return "cancelled", None, None
    return "failed", None, a.ResponseError(code=error.code or error.type, message=error.message)


def _item(item: dict[str, Any]) -> dict[str, Any]:
    copy = {**item}
    if item["type"] == "message":
        copy["content"] = [dict(p) for p in item["content"]]
    return copy
