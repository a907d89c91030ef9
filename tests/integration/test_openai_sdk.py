"""The OpenAI Python SDK, unchanged, against Ferry: the API a user's code actually calls."""

from __future__ import annotations

import json

import openai
import pytest

from tests.helpers import SMOLLM

HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(params=["/v1", "/api/v1"])
def client(base_url: str, request: pytest.FixtureRequest) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + request.param, api_key="unused", max_retries=0)


def test_models_list_and_get(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert SMOLLM in ids
    model = client.models.retrieve(SMOLLM)
    assert model.id == SMOLLM and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=SMOLLM, messages=HELLO, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == SMOLLM
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    kwargs = dict(model=SMOLLM, messages=HELLO, max_tokens=8, temperature=0, seed=1)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content


def test_stream_include_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=SMOLLM, messages=HELLO, max_tokens=6, stream=True,
        stream_options={"include_usage": True},
    ))
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 6 or chunks[-2].choices[0].finish_reason == "stop"


def test_text_completion_stream_and_not(client: openai.OpenAI) -> None:
    r = client.completions.create(model=SMOLLM, prompt="The capital of France is",
                                  max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    streamed = list(client.completions.create(model=SMOLLM, prompt="The capital of France is",
                                              max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_prompt_list_and_n_give_one_choice_each(client: openai.OpenAI) -> None:
    r = client.completions.create(model=SMOLLM, prompt=["One, two,", "Red, green,"], n=2,
                                  max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # same prompt, greedy
    assert r.choices[0].text != r.choices[2].text
    chat = client.chat.completions.create(model=SMOLLM, messages=HELLO, n=2, max_tokens=4)
    assert [c.index for c in chat.choices] == [0, 1]


def test_stop_sequence_is_not_returned(client: openai.OpenAI) -> None:
    prompt = "Count: 1, 2, 3, 4, 5,"
    free = client.completions.create(model=SMOLLM, prompt=prompt, max_tokens=8, temperature=0)
    text = free.choices[0].text
    assert "7" in text, text  # the model counts on; now stop it at "7"
    stopped = client.completions.create(model=SMOLLM, prompt=prompt, max_tokens=8,
                                        temperature=0, stop=["7"])
    assert stopped.choices[0].text == text[: text.index("7")]
    assert stopped.choices[0].finish_reason == "stop"


def test_json_object_is_valid_json(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=SMOLLM, max_tokens=64, temperature=0,
        messages=[{"role": "user", "content": 'Capital of France? Reply as {"capital": ...}'}],
        response_format={"type": "json_object"},
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_json_schema_is_enforced(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=SMOLLM, max_tokens=48, temperature=0,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
    )
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"city", "sunny"}
    assert isinstance(data["city"], str) and isinstance(data["sunny"], bool)


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=SMOLLM, messages=HELLO, max_tokens=4,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert max(x.logprob for x in t.top_logprobs) >= t.logprob - 1e-4


def test_text_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=SMOLLM, prompt="Hello", max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(top) == 2 for top in lp.top_logprobs)
