"""Tool calling on the worker: the prompt that offers the tools, and the grammar and format the
answer takes.

- A named `tool_choice`: the answer is that tool's arguments, under a grammar from its schema.
- `required`: a JSON list of calls (one, without `parallel_tool_calls`), under a grammar.
- `auto`: where the chat template renders tools and its family's call format is known (Hermes and
  Qwen `<tool_call>`, Llama 3.x, Mistral `[TOOL_CALLS]`), the model answers in that format and the
  grammar switches on at the trigger (lazily); otherwise llama.cpp's generic format, under a
  grammar from the first token: `{"tool_calls": [...]}` or `{"response": "..."}`.

Templates that cannot render tools get them described in the system prompt, their earlier calls
as JSON in the assistant's turn and tool results as user turns, with consecutive turns of one role
merged, so templates that insist on alternating roles (Gemma's) take a tool conversation too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import jinja2
from llama_cpp import llama_chat_format

from shared.errors import InvalidRequest
from shared.jobs import Tools
from workers.chat import tool_parse
from workers.engine.sampling import Grammar, schema_grammar


@dataclass
class Plan:
    """How one chat job offers tools and reads the answer."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None  # for a template that renders them itself
    grammar: Grammar | None
    format: Callable[[], tool_parse.Format] | None = None  # None: no tools, plain text
    parallel: bool = True


def family(template: str | None) -> str | None:
    """The tool-call format a chat template teaches its model, where Ferry knows it."""
    if not template or "tools" not in template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    return None


def plan(messages: list[dict[str, Any]], tools: Tools | None, kind: str | None,
         token_of: Callable[[str], int | None]) -> Plan:
    """`kind`: the template's `family`, found once per model; `token_of`: the id of a text that
    is one token of the vocabulary, else None."""
    if tools is None:  # no tools offered (or tool_choice none): earlier calls still render
        if not any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            return Plan(messages, None, None)
        return Plan(_native(messages, kind) if kind else _fallback(messages, None), None, None)
    functions, named = tools.functions, tools.named
    fmt: Callable[[], tool_parse.Format]
    if named is not None:
        fmt = functools.partial(tool_parse.ArgsOnly, named["name"])
        grammar = schema_grammar(_parameters(named), "tools")
    elif tools.choice == "required":
        fmt, grammar = tool_parse.CallList, schema_grammar(_call_list(functions, tools.parallel),
                                                          "tools")
    elif kind is None:
        fmt, grammar = tool_parse.Generic, schema_grammar({
            "$defs": _defs(functions),
            "anyOf": [_object({"tool_calls": _call_list(functions, tools.parallel)}),
                      _object({"response": {"type": "string"}})],
        }, "tools")
    else:
        fmt, grammar = _lazy(kind, functions, tools.parallel, token_of)
    if kind is None or named is not None or tools.choice == "required":
        # The grammar decides the format: say it in words the model can follow.
        return Plan(_fallback(messages, _describe(tools)), None, grammar, fmt, tools.parallel)
    return Plan(_native(messages, kind), [{"type": "function", "function": f} for f in functions],
                grammar, fmt, tools.parallel)


# Grammars


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    """A tool's arguments schema; none means no arguments, `{}`."""
    params = function.get("parameters")
    if not params:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return params


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def _defs(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """Every tool's `$defs`, lifted to the root where their `#/$defs/...` references point."""
    out: dict[str, Any] = {}
    for f in functions:
        params = f.get("parameters") or {}
        for key in ("$defs", "definitions"):
            for name, schema in (params.get(key) or {}).items():
                if out.setdefault(name, schema) != schema:
                    raise InvalidRequest(f"Tools define '{name}' differently in their schemas",
                                         param="tools")
    return out


def _calls(functions: list[dict[str, Any]], args_key: str = "arguments") -> dict[str, Any]:
    return {"anyOf": [_object({"name": {"const": f["name"]}, args_key: _inline(_parameters(f))})
                      for f in functions]}


def _inline(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in ("$defs", "definitions")}


def _call_list(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": _calls(functions), "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    if defs := _defs(functions):
        schema["$defs"] = defs
    return schema


def _lazy(kind: str, functions: list[dict[str, Any]], parallel: bool,
          token_of: Callable[[str], int | None]) -> tuple[type[tool_parse.Format], Grammar]:
    """A family's format, and its grammar, idle until the model starts a call."""
    args_key = "parameters" if kind == "llama3" else "arguments"
    call = schema_grammar({"$defs": _defs(functions), **_calls(functions, args_key)}, "tools")
    rules = re.sub(r"^root ::=", "call ::=", call.gbnf, flags=re.M)
    fmt: type[tool_parse.Format]
    if kind == "hermes":
        tag, fmt = "<tool_call>", tool_parse.Hermes
        one = '"<tool_call>" ws call ws "</tool_call>"'
        root = f"root ::= {one}" + (f" (ws {one})*" if parallel else "")
        patterns = [re.escape(tag)]
    elif kind == "mistral":
        tag, fmt = "[TOOL_CALLS]", tool_parse.Mistral
        more = ' (ws "," ws call)*' if parallel else ""
        root = f'root ::= "[TOOL_CALLS]" ws "[" ws call{more} ws "]"'
        patterns = [re.escape(tag)]
    else:  # llama3: after <|python_tag|>, or an answer that is a call from its first brace
        tag, fmt = "<|python_tag|>", tool_parse.Llama3
        more = ' (ws ";" ws call)*' if parallel else ""
        root = f'root ::= ("<|python_tag|>" ws)? call{more}'
        patterns = [r"^\s*(\{)[\s\S]*$", re.escape(tag)]
    token = token_of(tag)
    return fmt, Grammar(f"{root}\nws ::= [ \\t\\n]*\n{rules}", tuple(patterns),
                        (token,) if token is not None else ())


# Prompts


def render(formatter: llama_chat_format.ChatFormatter, plan: Plan
           ) -> llama_chat_format.ChatFormatterResponse:
    """The prompt; a template that refuses system turns (Gemma 2's) gets them in the first
    user turn instead."""
    try:
        return formatter(messages=cast(Any, plan.messages), tools=cast(Any, plan.tools))
    except (jinja2.TemplateError, ValueError, TypeError):
        if not any(m["role"] == "system" for m in plan.messages):
            raise
    system = "\n\n".join(m["content"] or "" for m in plan.messages if m["role"] == "system")
    rest = [m for m in plan.messages if m["role"] != "system"]
    first = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first is None:
        rest.insert(0, {"role": "user", "content": system})
    else:
        rest[first] = {**rest[first], "content": f"{system}\n\n{rest[first]['content'] or ''}"}
    return formatter(messages=cast(Any, rest), tools=cast(Any, plan.tools))


def _describe(tools: Tools) -> str:
    listed = json.dumps([{k: f[k] for k in ("name", "description", "parameters") if f.get(k)}
                         for f in tools.functions], ensure_ascii=False)
    if tools.named is not None:
        how = f"Call the tool {tools.forced}: answer with its arguments as a JSON object."
    elif tools.choice == "required":
        how = ('Call one or more of them: answer with a JSON list of calls, '
               '[{"name": <tool name>, "arguments": <arguments object>}].')
    else:
        how = ('Answer in JSON: {"tool_calls": [{"name": <tool name>, "arguments": '
               '<arguments object>}]} to call tools, or {"response": "<your answer>"} to answer '
               'the user directly.')
    return f"You can call these tools:\n{listed}\n{how}"


def _arguments(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _native(messages: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Messages for a template that renders tool calls itself: arguments as objects, as the
    templates of Hermes, Qwen and Llama 3 expect them; call ids of the 9 letters and digits
    Mistral's templates insist on."""
    def call_id(value: str) -> str:
        return hashlib.sha1(value.encode()).hexdigest()[:9] if kind == "mistral" else value

    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "id": call_id(c["id"]),
                 "function": {**c["function"],
                              "arguments": _arguments(c["function"]["arguments"])}}
                for c in m["tool_calls"]]
        if "tool_call_id" in m:
            m["tool_call_id"] = call_id(m["tool_call_id"])
        out.append(m)
    return out


def _fallback(messages: list[dict[str, Any]], described: str | None) -> list[dict[str, Any]]:
    """Messages any template takes: no tool roles, no empty content, no two turns of one role
    in a row."""
    names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or []}
    turns: list[dict[str, Any]] = []
    if described is not None:
        turns.append({"role": "system", "content": described})
    for m in messages:
        role, text = m["role"], m.get("content") or ""
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"],
                      "arguments": _arguments(c["function"]["arguments"])}
                     for c in m["tool_calls"]]
            text = "\n".join(t for t in (text, json.dumps({"tool_calls": calls},
                                                           ensure_ascii=False)) if t)
        if role == "tool":
            name = names.get(m.get("tool_call_id", ""), "the tool")
            role, text = "user", f"Result of {name} (call {m.get('tool_call_id')}):\n{text}"
        if turns and turns[-1]["role"] == role:
            turns[-1] = {**turns[-1], "content": f"{turns[-1]['content']}\n\n{text}"}
        else:
            turns.append({"role": role, "content": text})
    return turns
