"""Tool calling through the OpenAI SDK, LangChain and raw HTTP, against the real models.

SmolLM2 and Gemma 3 have chat templates that know no tools, so these go through the fallback
(tools described in the prompt, the generic format, results as user turns); the families' own
formats are read in tests/test_toolparse.py from recorded outputs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.helpers import SMOLLM, Proc, error_of, start_worker

GEMMA = "gemma3-270m-it"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Rome"]},
        "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
FORCE = {"type": "function", "function": {"name": "get_weather"}}
CITIES = ("Paris", "Oslo", "Rome")


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def gemma(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_worker(env, GEMMA, tmp_path_factory.mktemp("tools") / "gemma.log",
                        timeout_s=120)
    yield proc
    proc.stop()


def weather_args(arguments: str) -> dict[str, Any]:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and args["city"] in CITIES and args["unit"] in "cf"
    return dict(args)


def test_forced_tool_gives_that_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=SMOLLM, messages=ASK, tools=[WEATHER, CLOCK],
                                       tool_choice=FORCE, max_tokens=40, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"  # as OpenAI answers a named tool_choice
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    weather_args(call.function.arguments)


def test_tool_without_parameters_gets_empty_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=SMOLLM, messages=[{"role": "user", "content": "What time is it?"}],
        tools=[CLOCK], tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=8)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}


def test_required_gives_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=SMOLLM, messages=ASK, tools=[WEATHER, CLOCK],
                                       tool_choice="required", parallel_tool_calls=False,
                                       max_tokens=48, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        weather_args(call.function.arguments)
    else:
        assert args == {}


def test_none_and_auto(client: openai.OpenAI) -> None:
    none = client.chat.completions.create(model=SMOLLM, messages=ASK, tools=[WEATHER],
                                          tool_choice="none", max_tokens=8)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    auto = client.chat.completions.create(model=SMOLLM, messages=ASK, tools=[WEATHER, CLOCK],
                                          max_tokens=64, temperature=0)
    choice = auto.choices[0]
    if choice.message.tool_calls:  # either a valid call ...
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert call.function.name in ("get_weather", "get_time")
            json.loads(call.function.arguments)
    else:  # ... or plain text, never the JSON wrapper around it
        assert choice.message.content is not None
        assert not choice.message.content.lstrip().startswith('{"response"')


def test_stream_accumulates_into_the_call(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model=SMOLLM, messages=ASK, tools=[WEATHER],
                                        tool_choice=FORCE, max_tokens=40,
                                        temperature=0) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather"  # once, not repeated by every piece
    weather_args(call.function.arguments)


def test_raw_stream_delta_shapes(http: httpx.Client, base_url: str) -> None:
    body = {"model": SMOLLM, "messages": ASK, "tools": [WEATHER], "tool_choice": FORCE,
            "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        chunks = [orjson.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    pieces = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert all(len(p) == 1 for p in pieces)
    first, *rest = [p[0] for p in pieces]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert rest and all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"}
                        for p in rest)
    weather_args("".join(p["function"]["arguments"] for p in rest))
    assert deltas[0]["role"] == "assistant" and deltas[0]["content"] is None
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    whole = http.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == \
        "".join(p["function"]["arguments"] for p in rest)


@pytest.mark.parametrize("model", [SMOLLM, GEMMA])
def test_tool_result_round_trip(client: openai.OpenAI, gemma: Proc, model: str) -> None:
    """A call, its result, and the answer that uses it; Gemma's template refuses `content: null`
    and non-alternating roles, so this is where the fallback has to hold."""
    call = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER],
                                          tool_choice=FORCE, max_tokens=40, temperature=0)
    made = call.choices[0].message.tool_calls[0]
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [made.model_dump()]},
               {"role": "tool", "tool_call_id": made.id, "content": "21 degrees, sunny"}]
    r = client.chat.completions.create(model=model, messages=history, tools=[WEATHER],
                                       tool_choice="none", max_tokens=12)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    again = client.chat.completions.create(model=model, messages=history, tools=[WEATHER],
                                           max_tokens=48)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_bad_tool_requests(http: httpx.Client) -> None:
    def post(**body: Any) -> httpx.Response:
        return http.post("/v1/chat/completions",
                         json={"model": SMOLLM, "messages": ASK, "max_tokens": 4, **body})

    err = error_of(post(tools=[WEATHER], tool_choice={"type": "function",
                                                      "function": {"name": "nope"}}), 400)
    assert err["param"] == "tool_choice" and "nope" in str(err["message"])
    assert error_of(post(tool_choice="required"), 400)["param"] == "tool_choice"
    assert error_of(post(tools=[WEATHER, WEATHER]), 400)["param"] == "tools"
    assert error_of(post(tools=[{"type": "function", "function": {"name": "bad name!"}}]),
                    400)["param"].startswith("tools")
    unenforceable = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}}
    assert error_of(post(tools=[unenforceable], tool_choice="required"), 400)["param"] == "tools"
    both = post(tools=[WEATHER], response_format={"type": "json_object"})
    assert error_of(both, 400)["param"] == "response_format"
    orphan = [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "21"}]
    err = error_of(post(messages=orphan), 400)
    assert err["param"] == "messages[1].tool_call_id"
    assert error_of(post(functions=[{"name": "f"}]), 400)["param"] == "functions"


def test_run_requires_action_then_completes(http: httpx.Client) -> None:
    assistant = http.post("/v1/assistants", json={
        "model": SMOLLM, "tools": [WEATHER], "parameters": {"temperature": 0}}).json()
    assert assistant["tools"][0]["function"]["name"] == "get_weather"
    thread = http.post("/v1/threads", json={"messages": ASK}).json()
    run = http.post(f"/v1/threads/{thread['id']}/runs", json={
        "assistant_id": assistant["id"], "tool_choice": FORCE,
        "max_completion_tokens": 40}).json()
    run = wait_for(http, thread["id"], run["id"], "requires_action")
    [call] = run["required_action"]["submit_tool_outputs"]["tool_calls"]
    assert run["required_action"]["type"] == "submit_tool_outputs"
    assert call["function"]["name"] == "get_weather"
    weather_args(call["function"]["arguments"])
    path = f"/v1/threads/{thread['id']}/runs/{run['id']}/submit_tool_outputs"
    err = error_of(http.post(path, json={"tool_outputs": [{"tool_call_id": "call_other",
                                                           "output": "x"}]}), 400)
    assert err["param"] == "tool_outputs"
    # A forced choice holds for the first answer only: then the model answers, or calls again
    # (SmolLM2 tends to), and each call waits for its result in turn.
    turns = [call["id"]]
    for _ in range(3):
        going = http.post(path, json={"tool_outputs": [{"tool_call_id": turns[-1],
                                                        "output": "21 degrees, sunny"}]})
        assert going.status_code == 200, going.text
        run = wait_for(http, thread["id"], run["id"], "completed", "requires_action")
        if run["status"] == "completed":
            break
        [again] = run["required_action"]["submit_tool_outputs"]["tool_calls"]
        assert again["id"] not in turns
        turns.append(again["id"])
    if run["status"] == "completed":
        assert run["required_action"] is None
        last = http.get(f"/v1/threads/{thread['id']}/messages", params={"limit": 1}).json()
        assert last["data"][0]["run_id"] == run["id"] and last["data"][0]["role"] == "assistant"
        error_of(http.post(path, json={"tool_outputs": [{"tool_call_id": turns[-1]}]}), 400)


def test_run_cut_mid_call_is_incomplete(http: httpx.Client) -> None:
    thread = http.post("/v1/threads", json={"messages": ASK}).json()
    run = http.post(f"/v1/threads/{thread['id']}/runs", json={
        "tools": [WEATHER], "tool_choice": FORCE, "max_completion_tokens": 3}).json()
    run = wait_for(http, thread["id"], run["id"], "incomplete")
    assert run["incomplete_details"] == {"reason": "max_completion_tokens"}
    assert run["required_action"] is None


def test_streamed_run_shows_the_call(http: httpx.Client, base_url: str) -> None:
    thread = http.post("/v1/threads", json={"messages": ASK}).json()
    with httpx.stream("POST", f"{base_url}/v1/threads/{thread['id']}/runs", timeout=60, json={
            "stream": True, "tools": [WEATHER], "tool_choice": FORCE,
            "max_completion_tokens": 40}) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    names = [line[7:] for line in lines if line.startswith("event: ")]
    assert names[-2:] == ["thread.run.requires_action", "done"]
    steps = [orjson.loads(line[6:]) for line in lines
             if line.startswith("data: ") and '"thread.run.step.delta"' in line]
    calls = [c for s in steps for c in s["delta"]["step_details"]["tool_calls"]]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    run = orjson.loads([line for line in lines if line.startswith("data: ")][-2][6:])
    [asked] = run["required_action"]["submit_tool_outputs"]["tool_calls"]
    assert asked["function"]["arguments"] == "".join(c["function"]["arguments"] for c in calls)


def wait_for(http: httpx.Client, thread_id: str, run_id: str, *statuses: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        run = http.get(f"/v1/threads/{thread_id}/runs/{run_id}").json()
        if run["status"] in statuses:
            return dict(run)
        assert run["status"] in ("queued", "in_progress"), run
        assert time.monotonic() < deadline, run
        time.sleep(0.1)


class Weather(BaseModel):
    """The weather to look up."""

    city: str = Field(description="A city", json_schema_extra={"enum": list(CITIES)})
    unit: str = Field(json_schema_extra={"enum": ["c", "f"]})


def test_langchain_bind_tools_and_structured_output(base_url: str) -> None:
    llm = ChatOpenAI(base_url=base_url + "/v1", api_key="unused", model=SMOLLM,  # type: ignore[arg-type]
                     temperature=0, max_tokens=40, max_retries=0)
    forced = llm.bind_tools([Weather], tool_choice="Weather")
    message = forced.invoke("What is the weather in Oslo?")
    [call] = message.tool_calls
    assert call["name"] == "Weather" and call["args"]["city"] in CITIES
    merged = None
    for chunk in forced.stream("What is the weather in Oslo?"):
        merged = chunk if merged is None else merged + chunk
    assert merged is not None
    [streamed] = merged.tool_calls
    assert streamed["name"] == "Weather" and streamed["args"] == call["args"]
    structured = llm.with_structured_output(Weather, method="function_calling")
    result = structured.invoke("What is the weather in Rome?")
    assert isinstance(result, Weather) and result.city in CITIES and result.unit in ("c", "f")
