"""Anthropic's Messages API through the Anthropic SDK and LangChain's ChatAnthropic, unchanged."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import pytest
from langchain_anthropic import ChatAnthropic

from tests.helpers import SMOLLM, sse_events

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
HELLO = [{"role": "user", "content": "Say hello."}]
GREEDY = {"temperature": 0}  # the SDK no longer takes it as an argument; the API still does


@pytest.fixture
def client(base_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0)


def test_create(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=SMOLLM, max_tokens=8, messages=HELLO, extra_body=GREEDY,
                               system=[{"type": "text", "text": "Be brief.",
                                        "cache_control": {"type": "ephemeral"}}],
                               metadata={"user_id": "u1"})
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.output_tokens <= 8
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens > 0


def test_stream_helper_matches_create(client: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = dict(model=SMOLLM, max_tokens=24, messages=HELLO, extra_body=GREEDY)
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    # The second asking read the first's prompt from the cache, counted as Anthropic counts it.
    assert final.usage.cache_read_input_tokens > 0
    total = final.usage.input_tokens + final.usage.cache_read_input_tokens
    counted = client.messages.count_tokens(model=SMOLLM, messages=HELLO)
    assert counted.input_tokens == total == whole.usage.input_tokens + \
        whole.usage.cache_read_input_tokens + whole.usage.cache_creation_input_tokens


def test_raw_frames_name_their_events(http: httpx.Client) -> None:
    with http.stream("POST", "/v1/messages?beta=true", headers={
            "anthropic-version": "2023-06-01", "anthropic-beta": "not-a-real-beta-2099"},
            json={"model": SMOLLM, "max_tokens": 6, "stream": True, "messages": HELLO,
                  "thinking": {"type": "enabled", "budget_tokens": 1024},
                  "context_management": {"edits": []}}) as r:
        lines = list(r.iter_lines())
    names = [line[7:] for line in lines if line.startswith("event: ")]
    datas = [json.loads(d) for _, d in sse_events(iter(lines))]
    assert names == [d["type"] for d in datas]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta",
                                                                     "message_stop"]
    assert datas[0]["message"]["content"] == [] and "input_tokens" in datas[0]["message"]["usage"]
    starts = [d["index"] for d in datas if d["type"] == "content_block_start"]
    assert starts == [d["index"] for d in datas if d["type"] == "content_block_stop"]
    assert starts == list(range(len(starts)))


def test_stop_reasons(client: anthropic.Anthropic) -> None:
    short = client.messages.create(model=SMOLLM, max_tokens=2, extra_body=GREEDY,
                                   messages=[{"role": "user", "content": "Tell a long story."}])
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2
    first = client.messages.create(model=SMOLLM, max_tokens=30, extra_body=GREEDY,
                                   messages=[{"role": "user", "content": "Tell a long story."}])
    word = first.content[0].text.split()[2]
    stopped = client.messages.create(model=SMOLLM, max_tokens=30, extra_body=GREEDY,
                                     stop_sequences=[word],
                                     messages=[{"role": "user", "content": "Tell a long story."}])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert word not in stopped.content[0].text
    with client.messages.stream(model=SMOLLM, max_tokens=32000, extra_body=GREEDY,
                                messages=HELLO) as stream:  # Claude Code's: a ceiling, never refused
        assert stream.get_final_message().stop_reason in ("end_turn", "max_tokens")


def test_forced_tool_streamed_and_round_trip(client: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    with client.messages.stream(model=SMOLLM, max_tokens=60, extra_body=GREEDY, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=ask) as stream:
        pieces = [e.delta.partial_json for e in stream
                  if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
        final = stream.get_final_message()
    use = next(b for b in final.content if b.type == "tool_use")
    assert use.id.startswith("toolu_") and use.name == "get_weather"
    assert isinstance(use.input["city"], str) and json.loads("".join(pieces)) == use.input
    assert final.stop_reason == "tool_use"
    answer = client.messages.create(model=SMOLLM, max_tokens=30, extra_body=GREEDY, tools=[WEATHER],
                                    messages=[*ask, {"role": "assistant", "content": final.content},
                                              {"role": "user", "content": [
                                                  {"type": "tool_result", "tool_use_id": use.id,
                                                   "content": "Sunny, 21 C"}]}])
    assert answer.content and answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    anyone = client.messages.create(model=SMOLLM, max_tokens=60, extra_body=GREEDY, tools=[WEATHER],
                                    tool_choice={"type": "any"}, messages=ask)
    assert anyone.stop_reason == "tool_use"


def test_langchain_chat_anthropic(base_url: str) -> None:
    llm = ChatAnthropic(model=SMOLLM, base_url=base_url, api_key="unused", max_tokens=16,
                        temperature=0, max_retries=0)
    said = llm.invoke("Say hello.")
    assert isinstance(said.content, str) and said.content
    streamed = "".join(str(c.content) for c in llm.stream("Say hello."))
    assert streamed == said.content


@pytest.mark.parametrize("body,status,kind", [
    ({"model": SMOLLM, "messages": HELLO}, 400, "invalid_request_error"),  # no max_tokens
    ({"model": SMOLLM, "max_tokens": 5, "messages": []}, 400, "invalid_request_error"),
    ({"model": "no-such-model", "max_tokens": 5, "messages": HELLO}, 404, "not_found_error"),
    ({"model": SMOLLM, "max_tokens": 5, "messages": HELLO, "temperature": 2}, 400,
     "invalid_request_error"),
    ({"model": SMOLLM, "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "invalid_request_error"),
    ({"model": SMOLLM, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "data": ""}}]}]}, 400,
     "invalid_request_error"),
    ({"model": SMOLLM, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_x", "content": "r"}]}]}, 400,
     "invalid_request_error"),
    ({"model": SMOLLM, "max_tokens": 5, "messages": HELLO, "tools": [WEATHER],
      "tool_choice": {"type": "tool", "name": "other"}}, 400, "invalid_request_error"),
    ({"model": SMOLLM, "max_tokens": 5, "messages": HELLO, "frobnicate": True}, 400,
     "invalid_request_error"),
])
def test_bad_input_in_anthropic_shape(http: httpx.Client, body: dict[str, Any], status: int,
                                      kind: str) -> None:
    r = http.post("/v1/messages", json=body)
    assert r.status_code == status, r.text
    error = r.json()
    assert error["type"] == "error" and set(error["error"]) == {"type", "message"}
    assert error["error"]["type"] == kind and error["error"]["message"]


def test_sdk_raises_its_own_errors(client: anthropic.Anthropic, http: httpx.Client) -> None:
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="no-such-model", max_tokens=4, messages=HELLO)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=SMOLLM, max_tokens=4, messages=[])
    # Only these routes speak Anthropic: a thread's messages keep OpenAI's shape.
    assert set(http.post("/v1/threads/nope/messages", json={}).json()) == {"error"}
