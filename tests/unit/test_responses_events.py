"""Responses' pieces that need no model: input items to chat messages, and the event machine."""

from __future__ import annotations

import pytest

from functions.responses.events import ResponseEvents
from functions.responses.items import chat_messages, input_items
from functions.responses.protocol import CreateResponse
from functions.responses.stored import ResponseRecord
from shared.errors import Cancelled, InvalidRequest
from shared.jobs import Delta, ToolCallDelta, Usage


def record(**settings: object) -> ResponseRecord:
    req = CreateResponse.model_validate({"input": "x", **settings})
    return ResponseRecord(id="resp_j1", job_id="j1", owner="o", created_at=1, model="m",
                          settings=req.echo())


def test_items_become_turns_that_take_it_in_turn() -> None:
    """Codex sends two developer messages and two user messages in a row: templates that insist
    on alternating turns get one system and one user message."""
    items = input_items([
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "A"}]},
        {"role": "developer", "content": "B"},
        {"role": "user", "content": [{"type": "input_text", "text": "C"}]},
        {"role": "user", "content": "D"},
        {"type": "reasoning", "summary": []},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "namespace": "ns",
         "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "two"}]},
    ])
    assert all(i["id"] for i in items) and len(items) == 8  # reasoning dropped
    messages = chat_messages("I", items)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assert messages[0]["content"] == "I\n\nA\n\nB" and messages[1]["content"] == "C\n\nD"
    assert [c["function"]["name"] for c in messages[2]["tool_calls"]] == ["f", "ns.g"]
    assert [m["content"] for m in messages[3:]] == ["one", "two"]


def test_an_output_for_no_call_is_refused() -> None:
    with pytest.raises(InvalidRequest) as e:
        chat_messages(None, input_items([{"type": "function_call_output", "call_id": "x",
                                          "output": "o"}]))
    assert e.value.param == "input[0].call_id"


def events_of(rec: ResponseRecord, deltas: list[Delta]) -> list[dict[str, object]]:
    ev = ResponseEvents(rec)
    out = ev.start()
    for d in deltas:
        out += ev.feed(d)
    return out + ev.finish(Usage(prompt_tokens=3, completion_tokens=len(deltas), cached_tokens=1))


TEXT_THEN_CALL = [
    Delta(index=0, text="Let me "), Delta(index=0, text="check."),
    Delta(index=0, tool_call=ToolCallDelta(index=0, id="call_1", name="w.get")),
    Delta(index=0, tool_call=ToolCallDelta(index=0, arguments='{"c"')),
    Delta(index=0, tool_call=ToolCallDelta(index=0, arguments=':1}'), finish_reason="tool_calls"),
]


def test_events_open_and_close_every_item_in_order() -> None:
    rec = record(tools=[{"type": "namespace", "name": "w", "tools": [{"name": "get"}]}])
    events = events_of(rec, TEXT_THEN_CALL)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    final = events[-1]["response"]
    message, call = final["output"]
    assert message["content"][0]["text"] == "Let me check." and message["status"] == "completed"
    assert (call["name"], call["namespace"], call["arguments"]) == ("get", "w", '{"c":1}')
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 1
    assert events_of(rec, TEXT_THEN_CALL)[:-1] == events[:-1]  # a replay is the same


def test_length_is_incomplete_and_a_cancel_is_cancelled() -> None:
    rec = record(max_output_tokens=2)
    events = events_of(rec, [Delta(index=0, text="a"), Delta(index=0, text="b",
                                                             finish_reason="length")])
    end = events[-1]
    assert end["type"] == "response.incomplete"
    assert end["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    ev = ResponseEvents(rec)
    ev.start()
    ev.feed(Delta(index=0, text="a"))
    failed = ev.fail(Cancelled("stop"))
    assert [e["type"] for e in failed][-1] == "response.failed"
    assert failed[-1]["response"]["status"] == "cancelled" and failed[-1]["response"]["error"] is None
