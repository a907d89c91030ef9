"""Responses' input items, checked and stored in one shape, and turned into chat messages.

An input is a string (one user message) or a list of items: messages (role user, assistant,
system or developer; content a string or parts), `function_call` and `function_call_output`
items (an output a string or a content array), and reasoning items, which are accepted and
dropped. Stored items carry an id, as `GET /v1/responses/{id}/input_items` shows them.
"""

from __future__ import annotations

import uuid
from typing import Any

from shared.errors import InvalidRequest

TEXT_PARTS = {"input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text"}
ROLES = {"user", "assistant", "system", "developer"}


def input_items(raw: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [_message("user", raw, None)]
    items = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidRequest("Each input item must be an object", param=f"input[{i}]")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise InvalidRequest(f"Unknown role {role!r}", param=f"input[{i}].role")
            items.append(_message(role, _text(item.get("content"), f"input[{i}].content"),
                                  item.get("id")))
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise InvalidRequest("A function_call item needs call_id and name",
                                     param=f"input[{i}]")
            arguments = item.get("arguments", "")
            call = {"id": item.get("id") or _id("fc"), "type": "function_call",
                    "status": "completed", "call_id": call_id, "name": name,
                    "arguments": arguments if isinstance(arguments, str) else ""}
            if item.get("namespace"):
                call["namespace"] = item["namespace"]
            items.append(call)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise InvalidRequest("A function_call_output item needs call_id",
                                     param=f"input[{i}].call_id")
            items.append({"id": item.get("id") or _id("fco"), "type": "function_call_output",
                          "status": "completed", "call_id": call_id,
                          "output": _text(item.get("output"), f"input[{i}].output")})
        elif kind == "reasoning":
            continue  # models here do not reason: nothing to replay
        else:
            raise InvalidRequest(f"Input items of type {kind!r} are not supported",
                                 param=f"input[{i}].type")
    return items


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages the model reads: the instructions as the system prompt, then the items.
    Neighbours of one role merge (several developer messages, a text and the calls after it), as
    chat templates that insist on turns taking it in turn need."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    calls: set[str] = set()
    for i, item in enumerate(items):
        if item["type"] == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            text = "".join(part["text"] for part in item["content"])
            _add(messages, {"role": role, "content": text})
        elif item["type"] == "function_call":
            calls.add(item["call_id"])
            name = f"{item['namespace']}.{item['name']}" if item.get("namespace") else item["name"]
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": name, "arguments": item["arguments"]}}
            _add(messages, {"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            if item["call_id"] not in calls:
                raise InvalidRequest(f"No tool call found for function call output with call_id "
                                     f"{item['call_id']!r}", param=f"input[{i}].call_id")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": item["output"]})
    return messages


def output_text(items: list[dict[str, Any]]) -> str:
    return "".join(p["text"] for it in items if it["type"] == "message" for p in it["content"])


def _add(messages: list[dict[str, Any]], message: dict[str, Any]) -> None:
    last = messages[-1] if messages else None
    if last is None or last["role"] != message["role"] or last["role"] == "tool":
        messages.append(message)
        return
    if message.get("tool_calls"):
        last.setdefault("tool_calls", []).extend(message["tool_calls"])
    elif last.get("tool_calls"):
        messages.append(message)  # text after a call is a new turn
    elif message["content"]:
        last["content"] = f"{last['content']}\n\n{message['content']}" if last["content"] \
            else message["content"]


def _message(role: str, text: str, item_id: Any) -> dict[str, Any]:
    part = "output_text" if role == "assistant" else "input_text"
    return {"id": item_id if isinstance(item_id, str) else _id("msg"), "type": "message",
            "role": role, "status": "completed", "content": [{"type": part, "text": text}]}


def _text(content: Any, param: str) -> str:
    """A content string, or the text of its parts; images, files and audio are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest("content must be a string or a list of parts", param=param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text", part.get("refusal")), str):
            raise InvalidRequest(f"Content parts of type {kind!r} are not supported: the models "
                                 "here read text", param=f"{param}[{j}]")
        texts.append(part.get("text", part.get("refusal")))
    return "".join(texts)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
