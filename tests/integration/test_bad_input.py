"""Bad input gets a clear OpenAI-style error with the right 4xx, never a 500 or a hang."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import SMOLLM, error_of

MSG = [{"role": "user", "content": "hi"}]




def test_invalid_json(http: httpx.Client) -> None:
    err = error_of(http.post("/v1/chat/completions", content=b"{not json"), 400)
    assert err["code"] == "invalid_json" and err["type"] == "invalid_request_error"
    error_of(http.post("/v1/completions", content=b"[1, 2]"), 400)


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -3}, "max_completion_tokens"),
        ({"n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {}}, "response_format.type"),
        ({"stream": "yes please"}, "stream"),
    ],
)
def test_chat_schema_violations_name_the_parameter(
    http: httpx.Client, patch: dict[str, object], param: str
) -> None:
    body = {"model": SMOLLM, "messages": MSG, "max_tokens": 4, **patch}
    err = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert err["param"] == param


@pytest.mark.parametrize(
    ("patch", "param"),
    [({"prompt": 42}, "prompt"), ({"prompt": []}, "prompt"), ({"logprobs": 9}, "logprobs"),
     ({"prompt": ["a"] * 9, "n": 2}, "n")],
)
def test_completion_schema_violations(
    http: httpx.Client, patch: dict[str, object], param: str
) -> None:
    body = {"model": SMOLLM, "prompt": "hi", "max_tokens": 4, **patch}
    assert error_of(http.post("/v1/completions", json=body), 400)["param"] == param


@pytest.mark.parametrize(
    "patch",
    [{"repeat_penalty": 3.402823466e38, "temperature": 0.4},
     {"repeat_penalty": 0, "temperature": 0.4},
     {"ignore_eos": True, "response_format": {"type": "json_object"}, "temperature": 0.4}],
)
def test_sampling_that_would_abort_llama_cpp_is_refused(
    http: httpx.Client, patch: dict[str, object]
) -> None:
    """Found by schemathesis: a completed grammar allows only the end, which ignore_eos bans, and
    a repeat_penalty of 0 or 3.4e38 makes logits infinite; llama.cpp then accepted a token the
    grammar rejects and aborted the worker (std::runtime_error through ctypes)."""
    body = {"model": SMOLLM, "prompt": "Return a JSON object.", "max_tokens": 60, **patch}
    param = "ignore_eos" if "ignore_eos" in patch else "repeat_penalty"
    assert error_of(http.post("/v1/completions", json=body), 400)["param"] == param
    r = http.post("/v1/completions", json={"model": SMOLLM, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text  # the worker is alive


def test_missing_prompt(http: httpx.Client) -> None:
    err = error_of(http.post("/v1/completions", json={"model": SMOLLM}), 400)
    assert err["param"] == "prompt" and err["code"] == "missing_required_parameter"


def test_unknown_model_is_404(http: httpx.Client) -> None:
    for path, body in [("/v1/chat/completions", {"messages": MSG}),
                       ("/api/v1/completions", {"prompt": "x"}),
                       ("/extras/tokenize", {"input": "x"})]:
        err = error_of(http.post(path, json={**body, "model": "gpt-17"}), 404)
        assert err["code"] == "model_not_found" and err["param"] == "model"


def test_body_too_large_is_413(http: httpx.Client) -> None:
    big = "x" * 70_000  # the test server allows 64 KiB
    err = error_of(http.post("/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": big}]}), 413)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True])
def test_context_length_exceeded(http: httpx.Client, stream: bool) -> None:
    body = {"model": SMOLLM, "messages": MSG, "max_tokens": 5000, "stream": stream}
    err = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    long_prompt = "word " * 3000  # the test workers run with a 2048-token context
    err = error_of(http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 4}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"


def test_wrong_method_and_unknown_path(http: httpx.Client) -> None:
    assert error_of(http.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"
    assert error_of(http.delete("/v1/completions"), 405)
    assert error_of(http.get("/v1/nothing-here"), 404)


def test_unsupported_content_part(http: httpx.Client) -> None:
    part = {"type": "image_url", "image_url": {"url": "data:,"}}
    err = error_of(http.post("/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": [part]}]}), 400)
    assert str(err["param"]).startswith("messages[0].content")


def test_tokenize_needs_input(http: httpx.Client) -> None:
    assert error_of(http.post("/extras/tokenize", json={}), 400)["param"] == "input"
    for path in ("/extras/tokenize", "/extras/tokenize/count"):
        err = error_of(http.post(path, json={"model": None, "input": "hi"}), 400)
        assert err["param"] == "model"
    err = error_of(http.post("/extras/detokenize", json={"tokens": [10**9]}), 400)
    assert err["param"] == "tokens"


def test_login_is_404_when_not_configured(http: httpx.Client) -> None:
    for path in ("/auth/google", "/auth/google/callback?code=x&state=y"):
        assert error_of(http.get(path), 404)["code"] == "login_not_configured"
