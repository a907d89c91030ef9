"""OpenAI's Responses API through the OpenAI SDK, unchanged: create, stream, store, chain, the
background with a resumed stream, tools, formats and every bad input."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

from shared import keys
from tests.helpers import SMOLLM, Proc, error_of, sse_events, start_web, start_worker

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def wait_done(client: openai.OpenAI, response_id: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.responses.retrieve(response_id)
        if r.status not in ("queued", "in_progress"):
            return r
        assert time.monotonic() < deadline, r.status
        time.sleep(0.1)


def check_events(events: list[Any]) -> None:
    """Numbered from 0 in order, created first, and every item that is added is done."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[1].type == "response.in_progress"
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    done = [e.output_index for e in events if e.type == "response.output_item.done"]
    assert added == done == list(range(len(added)))
    parts = [e.output_index for e in events if e.type == "response.content_part.added"]
    assert parts == [e.output_index for e in events if e.type == "response.content_part.done"]


def test_create_retrieve_and_delete(client: openai.OpenAI) -> None:
    r = client.responses.create(model=SMOLLM, input="Say hello.", max_output_tokens=8,
                                temperature=0, metadata={"k": "v"})
    assert r.id.startswith("resp_") and r.object == "response" and r.status in ("completed",
                                                                                "incomplete")
    assert r.output[0].type == "message" and r.output_text
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.metadata == {"k": "v"} and r.temperature == 0 and r.max_output_tokens == 8
    again = client.responses.retrieve(r.id)
    assert again.output_text == r.output_text and again.usage == r.usage
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_token_limit_is_incomplete(client: openai.OpenAI) -> None:
    r = client.responses.create(model=SMOLLM, input="Write a long story about a ship.",
                                max_output_tokens=3, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3


def test_stream_helper_and_events(client: openai.OpenAI) -> None:
    with client.responses.stream(model=SMOLLM, input="Say hello.", max_output_tokens=100,
                                 temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    check_events(events)
    assert events[-1].type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == final.output_text
    assert [e.text for e in events if e.type == "response.output_text.done"] == [text]
    plain = client.responses.create(model=SMOLLM, input="Say hello.", max_output_tokens=100,
                                    temperature=0)
    assert plain.output_text == text  # greedy: the same answer either way
    assert client.responses.retrieve(final.id).output_text == text


def test_every_frame_names_its_event(http: httpx.Client) -> None:
    """Raw SSE: an `event:` line matching the data's type, and no `[DONE]`."""
    with http.stream("POST", "/v1/responses", json={"model": SMOLLM, "input": "Hi",
                                                    "max_output_tokens": 4, "stream": True}) as r:
        lines = list(r.iter_lines())
    names = [line[7:] for line in lines if line.startswith("event: ")]
    datas = [json.loads(d) for _, d in sse_events(iter(lines))]
    assert names == [d["type"] for d in datas] and names[-1] in ("response.completed",
                                                                "response.incomplete")


def test_previous_response_chains_and_forks(client: openai.OpenAI) -> None:
    first = client.responses.create(model=SMOLLM, input="My name is Ada. Remember it.",
                                    instructions="You are terse.", max_output_tokens=6,
                                    temperature=0)
    second = client.responses.create(model=SMOLLM, input="What is my name?",
                                     previous_response_id=first.id, max_output_tokens=6,
                                     temperature=0)
    fork = client.responses.create(model=SMOLLM, input="What is my favourite colour?",
                                   previous_response_id=first.id, max_output_tokens=6,
                                   temperature=0)
    assert second.previous_response_id == first.id
    # The stored history comes first, so its prefix is still in the cache.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0
    seen = [i for i in client.responses.input_items.list(second.id, order="asc")]
    texts = [c.text for i in seen if i.type == "message" for c in i.content]
    assert texts == ["My name is Ada. Remember it.", first.output_text, "What is my name?"]
    forked = [c.text for i in client.responses.input_items.list(fork.id, order="asc")
              if i.type == "message" for c in i.content]
    assert forked == texts[:2] + ["What is my favourite colour?"]
    page = client.responses.input_items.list(second.id, limit=1)  # newest first
    assert [i.id for i in page.data] == [seen[-1].id] and page.has_more
    rest = client.responses.input_items.list(second.id, limit=5, after=page.data[0].id)
    assert [i.id for i in rest.data] == [i.id for i in seen[:-1]][::-1]
    counted = client.responses.input_tokens.count(model=SMOLLM, input="What is my name?",
                                                  previous_response_id=first.id)
    assert counted.input_tokens == second.usage.input_tokens


def test_unstored_responses_are_not_kept(client: openai.OpenAI) -> None:
    r = client.responses.create(model=SMOLLM, input="Hi", max_output_tokens=2, store=False)
    assert r.store is False and r.output_text is not None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=SMOLLM, input="Hi", previous_response_id=r.id)
    assert e.value.body["param"] == "previous_response_id"


def test_background_poll_and_cancel(client: openai.OpenAI, rds: redis.Redis) -> None:
    r = client.responses.create(model=SMOLLM, input="Say hello.", max_output_tokens=4,
                                background=True)
    assert r.status == "queued" and r.background is True
    assert wait_done(client, r.id).status in ("completed", "incomplete")
    long = client.responses.create(model=SMOLLM, input="Count to a thousand.",
                                   max_output_tokens=1500, background=True)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and cancelled.error is None
    assert client.responses.retrieve(long.id).status == "cancelled"
    assert client.responses.cancel(long.id).status == "cancelled"  # again: as it is
    plain = client.responses.create(model=SMOLLM, input="Hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(plain.id)
    running = client.responses.create(model=SMOLLM, input="Count to a thousand.",
                                      max_output_tokens=1500, background=True)
    time.sleep(0.3)
    client.responses.delete(running.id)  # stopped first: its worker writes nothing after
    time.sleep(1)
    assert not rds.exists(keys.stream(running.id.removeprefix("resp_")))
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(running.id)


@pytest.fixture
def second_web(env: dict[str, str], worker: Proc, tmp_path: Path) -> Iterator[str]:
    web, url = start_web(env, tmp_path / "web2.log")
    yield url
    web.stop()


def test_background_stream_resumes_on_another_web_process(
        client: openai.OpenAI, second_web: str) -> None:
    stream = client.responses.create(model=SMOLLM, input="Tell me about the sea.",
                                     max_output_tokens=60, temperature=0, background=True,
                                     stream=True)
    seen = []
    for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta" and len(seen) > 6:
            break
    stream.close()  # the client drops; a background response goes on
    response_id = seen[0].response.id
    other = openai.OpenAI(base_url=second_web + "/v1", api_key="unused", max_retries=0)
    rest = list(other.responses.retrieve(response_id, stream=True,
                                         starting_after=seen[-1].sequence_number))
    assert rest[0].sequence_number == seen[-1].sequence_number + 1
    events = seen + rest
    check_events(events)
    assert events[-1].type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == wait_done(other, response_id).output_text
    replay = list(other.responses.retrieve(response_id, stream=True))  # all of it, again
    assert [e.type for e in replay] == [e.type for e in events]


def test_function_call_round_trip(client: openai.OpenAI) -> None:
    with client.responses.stream(model=SMOLLM, input="What is the weather in Paris?",
                                 tools=[WEATHER], tool_choice="required",
                                 max_output_tokens=60, temperature=0) as stream:
        events = list(stream)
        call_response = stream.get_final_response()
    check_events(events)
    calls = [o for o in call_response.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    streamed = "".join(e.delta for e in events
                       if e.type == "response.function_call_arguments.delta")
    assert streamed == calls[0].arguments
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done[0].arguments == calls[0].arguments
    answer = client.responses.create(
        model=SMOLLM, previous_response_id=call_response.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                "output": "Sunny, 21 C"}], max_output_tokens=30, temperature=0)
    assert answer.status in ("completed", "incomplete") and answer.output
    # The same round trip with the history sent back by the client, not stored
    again = client.responses.create(
        model=SMOLLM, store=False, tools=[WEATHER], max_output_tokens=30, temperature=0,
        input=[{"role": "user", "content": "What is the weather in Paris?"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id,
                "output": [{"type": "input_text", "text": "Sunny, 21 C"}]}])
    assert again.usage.input_tokens == answer.usage.input_tokens


def test_namespace_and_hosted_tools(client: openai.OpenAI) -> None:
    """Codex's tool kinds: a namespace's functions are offered, tools Ferry cannot run are not."""
    tools = [{"type": "namespace", "name": "weather", "description": "Weather tools",
              "tools": [{k: v for k, v in WEATHER.items()}]},
             {"type": "web_search", "external_web_access": False}]
    r = client.responses.create(model=SMOLLM, input="Weather in Rome?", tools=tools,
                                tool_choice={"type": "function", "name": "get_weather",
                                             "namespace": "weather"},
                                max_output_tokens=40, temperature=0)
    call = r.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.namespace == "weather" and r.tools[1].type == "web_search"


def test_json_schema_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.responses.create(model=SMOLLM, input="Invent a person.", max_output_tokens=60,
                                temperature=0,
                                text={"format": {"type": "json_schema", "name": "person",
                                                 "schema": schema, "strict": True}})
    assert r.status == "completed", r.output_text
    person = json.loads(r.output_text)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    assert r.text.format.type == "json_schema"


def test_agents_sdk_calls_a_function_tool(base_url: str) -> None:
    """The OpenAI Agents SDK's default model (`OpenAIResponsesModel`), unchanged: a run that
    calls a function tool, and a streamed run."""
    set_tracing_disabled(True)
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        cities.append(city)
        return f"Sunny and 21 C in {city}"

    async def run() -> tuple[Any, Any]:
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
        model = OpenAIResponsesModel(model=SMOLLM, openai_client=client)
        agent = Agent(name="weather", instructions="Use get_weather to answer.", model=model,
                      tools=[get_weather], tool_use_behavior="stop_on_first_tool",
                      model_settings=ModelSettings(tool_choice="required", max_tokens=60,
                                                   temperature=0, parallel_tool_calls=False))
        called = await Runner.run(agent, "What is the weather in Paris?")
        plain = Agent(name="plain", instructions="Be brief.", model=model,
                      model_settings=ModelSettings(max_tokens=200, temperature=0))
        streamed = Runner.run_streamed(plain, "Say hello.")
        kinds = {e.type async for e in streamed.stream_events()}
        assert "raw_response_event" in kinds
        await client.close()
        return called, streamed

    called, streamed = asyncio.run(run())
    assert len(cities) == 1 and cities[0]
    assert called.final_output == f"Sunny and 21 C in {cities[0]}"
    assert [type(i).__name__ for i in called.new_items] == ["ToolCallItem", "ToolCallOutputItem"]
    assert isinstance(streamed.final_output, str) and streamed.final_output


@pytest.mark.parametrize("body,status,param", [
    ({"model": "no-such-model", "input": "Hi"}, 404, "model"),
    ({"model": SMOLLM}, 400, "input"),
    ({"model": SMOLLM, "input": ""}, 400, "input"),
    ({"model": SMOLLM, "input": []}, 400, "input"),
    ({"model": SMOLLM, "input": "Hi", "previous_response_id": "resp_nope"}, 400,
     "previous_response_id"),
    ({"model": SMOLLM, "input": "Hi", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": SMOLLM, "input": "Hi", "background": True, "store": False}, 400, "background"),
    ({"model": SMOLLM, "input": "Hi", "temperature": 3}, 400, "temperature"),
    ({"model": SMOLLM, "input": "Hi", "tools": [{"type": "teleport"}]}, 400, "tools[0].type"),
    ({"model": SMOLLM, "input": "Hi", "tools": [WEATHER], "tool_choice": {
        "type": "function", "name": "other"}}, 400, "tool_choice"),
    ({"model": SMOLLM, "input": [{"type": "function_call_output", "call_id": "c1",
                                  "output": "x"}]}, 400, "input[0].call_id"),
    ({"model": SMOLLM, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://x/y.png"}]}]}, 400, "input[0].content[0]"),
    ({"model": SMOLLM, "input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role"),
    ({"model": SMOLLM, "input": "Hi", "include": ["everything"]}, 400, "include[0]"),
    ({"model": SMOLLM, "input": "Hi", "text": {"format": {"type": "json_schema"}}}, 400,
     "text.format"),
])
def test_bad_input(http: httpx.Client, body: dict[str, Any], status: int, param: str) -> None:
    error = error_of(http.post("/v1/responses", json=body), status)
    assert error["param"] == param, error


def test_bad_paths(http: httpx.Client) -> None:
    error_of(http.get("/v1/responses/resp_nope"), 404)
    error_of(http.get("/v1/responses/bad id!"), 400)
    error_of(http.delete("/v1/responses/resp_nope"), 404)
    error_of(http.post("/v1/responses/resp_nope/cancel"), 404)
    error_of(http.get("/v1/responses/resp_nope/input_items"), 404)


def test_batch_of_responses(client: openai.OpenAI) -> None:
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
              "body": {"model": SMOLLM, "input": f"Say {i}.", "max_output_tokens": 3}}
             for i in range(3)]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/responses",
                  "body": {"model": SMOLLM, "input": "Hi", "previous_response_id": "resp_x"}})
    data = "\n".join(json.dumps(line) for line in lines).encode()
    made = client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=made.id, endpoint="/v1/responses",
                                  completion_window="24h")
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 3 and batch.request_counts.failed == 1
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    bodies = {o["custom_id"]: o["response"]["body"] for o in out}
    assert set(bodies) == {"r0", "r1", "r2"}
    assert all(b["object"] == "response" and b["usage"]["output_tokens"] <= 3
               for b in bodies.values())
    assert batch.usage.output_tokens == sum(b["usage"]["output_tokens"] for b in bodies.values())
    errors = client.files.content(batch.error_file_id).text
    assert "previous_response_id" in errors


def test_server_cap_on_generated_tokens(base_url: str, env: dict[str, str],
                                        victim: tuple[str, Path], tmp_path: Path) -> None:
    """FERRY_MAX_TOKENS stops every request that asks for more, or for no limit, with its API's
    own reason."""
    name, path = victim
    worker = start_worker({**env, "FERRY_MAX_TOKENS": "5"}, str(path), tmp_path / "w.log")
    try:
        c = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
        story = "Write a very long story about the sea."
        chat = c.chat.completions.create(model=name, messages=[{"role": "user", "content": story}],
                                         extra_body={"ignore_eos": True})
        assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 5
        text = c.completions.create(model=name, prompt=story, max_tokens=50,
                                    extra_body={"ignore_eos": True})
        assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 5
        r = c.responses.create(model=name, input=story)
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert r.usage.output_tokens == 5
        lower = c.chat.completions.create(model=name, max_tokens=2,
                                          messages=[{"role": "user", "content": story}])
        assert lower.usage.completion_tokens == 2  # a lower limit of its own holds
    finally:
        worker.stop()
