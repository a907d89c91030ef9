"""Tool-call formats read from recorded model outputs, streamed piece by piece as a model would.

The samples are the outputs llama.cpp's own tests (tests/test-chat.cpp) record for each family's
chat template; the templates in tests/data/templates are those models' own.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from tests.helpers import DATA
from workers.chat import tool_parse, tool_prompt
from workers.chat.tool_parse import ToolStream

TEMPLATES = DATA / "templates"


def stream(fmt: tool_parse.Format, text: str, step: int = 3, parallel: bool = True
           ) -> tuple[str, list[dict[str, Any]], list[Any]]:
    """Feed `text` in pieces of `step` characters; rebuild content and calls from the pieces as
    an OpenAI client does, and keep every piece to check its shape."""
    ts = ToolStream(fmt, parallel)
    content, calls, pieces = "", [], []
    for i in range(0, len(text), step):
        got, deltas = ts.feed(text[i:i + step], final=i + step >= len(text))
        content += got
        pieces += deltas
    for d in pieces:
        if d.id is not None:
            assert d.index == len(calls) and d.name and d.arguments == ""
            calls.append({"id": d.id, "name": d.name, "arguments": ""})
        else:
            assert d.name is None
            calls[d.index]["arguments"] += d.arguments
    return content, calls, pieces


def test_hermes_call_with_content_before_it() -> None:
    out = ('Hello, world!\nWhat\'s up?<tool_call>\n'
           '{"name": "special_function", "arguments": {"arg1": 1}}</tool_call>')
    content, calls, pieces = stream(tool_parse.Hermes(), out)
    assert content == "Hello, world!\nWhat's up?"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("special_function", {"arg1": 1})]
    assert len(pieces) > 2  # the arguments came in fragments, not at the end


def test_hermes_parallel_calls_and_plain_text() -> None:
    out = ('<tool_call>\n{"name": "a", "arguments": {"x": "}\\"{"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    _, calls, _ = stream(tool_parse.Hermes(), out, step=1)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("a", {"x": '}"{'}), ("b", {})]
    _, one, _ = stream(tool_parse.Hermes(), out, parallel=False)
    assert [c["name"] for c in one] == ["a"]
    # A text that only looks like the start of a tag is content once it is clearly not one.
    assert stream(tool_parse.Hermes(), "1 < 2 and <tool that is not")[0] == \
        "1 < 2 and <tool that is not"


def test_hermes_broken_call_is_content() -> None:
    out = "<tool_call>\nnot json at all"
    content, calls, _ = stream(tool_parse.Hermes(), out)
    assert calls == [] and content == out


def test_mistral_calls_with_ids() -> None:
    out = ('[TOOL_CALLS][{"name": "special_function", "arguments": {"arg1": 1}, '
           '"id": "123456789"}]')
    content, calls, _ = stream(tool_parse.Mistral(), out)
    assert content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("special_function", {"arg1": 1})]


def test_llama3_bare_json_and_python_tag() -> None:
    out = '{"name": "special_function", "parameters": {"arg1": 1}}'
    _, calls, _ = stream(tool_parse.Llama3(), out)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("special_function", {"arg1": 1})]
    tagged = '<|python_tag|>{"name": "f", "parameters": {"q": "a;b"}}; {"name": "g", "parameters": {}}'
    _, calls, _ = stream(tool_parse.Llama3(), tagged, step=2)
    assert [c["name"] for c in calls] == ["f", "g"]
    assert stream(tool_parse.Llama3(), "Hello, world!\nWhat's up?")[0] == "Hello, world!\nWhat's up?"
    # A JSON answer that is no call stays the answer.
    assert stream(tool_parse.Llama3(), '{"answer": 42}')[:2] == ('{"answer": 42}', [])


def test_generic_response_and_calls() -> None:
    content, calls, _ = stream(tool_parse.Generic(), '{"response": "Caf\\u00e9 \\"ok\\"\\n"}', 1)
    assert content == 'Café "ok"\n' and calls == []
    out = '{"tool_calls": [{"name": "w", "arguments": {"city": "Paris"}}, {"name": "t", "arguments": {}}]}'
    content, calls, _ = stream(tool_parse.Generic(), out)
    assert content == "" and [c["name"] for c in calls] == ["w", "t"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_required_list_and_named_arguments() -> None:
    _, calls, _ = stream(tool_parse.CallList(), '[{"name": "w", "arguments": {"n": 12}}]')
    assert json.loads(calls[0]["arguments"]) == {"n": 12}
    _, calls, pieces = stream(tool_parse.ArgsOnly("w"), '{"city": "Oslo", "days": 3}')
    assert calls[0]["name"] == "w" and json.loads(calls[0]["arguments"]) == {"city": "Oslo", "days": 3}
    assert pieces[0].id is not None


@pytest.mark.parametrize(("template", "family"), [
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "hermes"),
    ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja", "hermes"),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3"),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral"),
    ("google-gemma-2-2b-it.jinja", None),
])
def test_templates_render_a_tool_conversation(template: str, family: str | None) -> None:
    """Each family's own template takes the tools and a whole call → result → answer exchange
    (Gemma's, which knows no tools, through the fallback)."""
    source = (TEMPLATES / template).read_text()
    assert tool_prompt.family(source) == family
    weather = {"name": "get_weather", "description": "Weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                              "required": ["city"]}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "18C, sunny"},
    ]
    from shared.jobs import Tools
    plan = tool_prompt.plan(messages, Tools(functions=[weather]), family, lambda text: None)
    fmt = Jinja2ChatFormatter(template=source, eos_token="</s>", bos_token="<s>")
    prompt = tool_prompt.render(fmt, plan).prompt
    assert "18C, sunny" in prompt and "get_weather" in prompt
    assert plan.grammar is not None and plan.format is not None


def test_lazy_grammar_waits_for_the_trigger_then_holds_the_call() -> None:
    """The Hermes grammar on SmolLM2's real vocabulary, inside llama.cpp: free text until
    `<tool_call>`, then only what leads to a valid call of a known tool."""

    import llama_cpp
    from llama_cpp._internals import LlamaModel

    from shared.jobs import Tools
    from tests.helpers import allowed_tokens, smollm_path
    from workers.engine import sampling

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = LlamaModel(path_model=str(smollm_path()), params=params, verbose=False)
    try:
        weather = {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
        source = (TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
        plan = tool_prompt.plan([{"role": "user", "content": "Weather?"}], Tools(functions=[weather]),
                          tool_prompt.family(source), lambda text: None)
        assert plan.grammar is not None and plan.grammar.patterns == ("<tool_call>",)
        sampler = sampling._grammar_sampler(model, plan.grammar)
        n_vocab = model.n_vocab()


        def accept(text: str) -> None:
            for token in model.tokenize(text.encode(), add_bos=False, special=False):
                llama_cpp.llama_sampler_accept(sampler, token)

        def token(text: str) -> int:
            [t] = model.tokenize(text.encode(), add_bos=False, special=False)
            return t

        accept("Let me look that up. ")
        assert len(allowed_tokens(sampler, n_vocab)) == n_vocab  # not triggered: any text goes
        accept("<tool_call>\n")
        free = allowed_tokens(sampler, n_vocab)
        assert token("Hello") not in free and token("{") in free
        accept('{"name": "')
        named = allowed_tokens(sampler, n_vocab)
        assert token("get") in named and token("Hello") not in named  # no tool of that name
    finally:
        model.close()
