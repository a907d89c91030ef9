"""OpenAI's answer objects as the renderer builds them from a job's messages.

`tests/data/render_expected.json` holds what the hand-built dicts of the renderer before
`functions.openai.answers` existed gave for these same messages: the pydantic models must
answer byte for byte the same JSON.
"""

from __future__ import annotations

import json
from typing import Any

from functions.openai.render import Renderer
from functions.queue.submit import JobMeta
from shared.jobs import Delta, Logprobs, ToolCallDelta, Usage
from tests.helpers import DATA

LP = Logprobs(tokens=["Hi"], token_logprobs=[-0.5], top_logprobs=[{"Hi": -0.5, "Yo": -1.5}],
              text_offset=[0])


def rendered() -> dict[str, Any]:
    out: dict[str, Any] = {}
    chat = JobMeta(id="job_1", kind="chat", model="m", created=7, include_usage=True, choices=2)
    r = Renderer(chat)
    deltas = [Delta(index=0, text="Hi", logprobs=LP),
              Delta(index=1, tool_call=ToolCallDelta(index=0, id="call_1", name="f")),
              Delta(index=1, tool_call=ToolCallDelta(index=0, arguments='{"a": 1}'),
                    finish_reason="tool_calls"),
              Delta(index=0, text="", finish_reason="stop")]
    out["chat_chunks"] = [r.chunk(d) for d in deltas]
    out["chat_usage"] = r.usage_chunk(Usage(prompt_tokens=3, completion_tokens=2, cached_tokens=1))
    out["chat_response"] = Renderer(chat).response(deltas, Usage(prompt_tokens=3, completion_tokens=2),
                                                   2)
    text = JobMeta(id="job_2", kind="text", model="m", created=7)
    t = Renderer(text)
    pieces = [Delta(index=0, text="a", logprobs=LP), Delta(index=0, text="b", finish_reason="length")]
    out["text_chunks"] = [t.chunk(d) for d in pieces]
    out["text_usage"] = t.usage_chunk(Usage(prompt_tokens=1))
    out["text_response"] = t.response(pieces, Usage(prompt_tokens=1, completion_tokens=2), 1)
    out["empty"] = Renderer(chat).response([], Usage(), 1)
    return out


def test_answers_are_the_json_the_hand_built_renderer_gave() -> None:
    expected = json.loads((DATA / "render_expected.json").read_text())
    assert json.loads(json.dumps(rendered())) == expected


def test_role_once_per_choice_and_content_null_beside_a_call() -> None:
    chunks = rendered()["chat_chunks"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": "Hi"}
    assert deltas[1] == {"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    assert deltas[2] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}
    assert all(c["usage"] is None for c in chunks)  # include_usage: null until the last chunk
    assert "usage" not in rendered()["text_chunks"][0]
