"""Reading tool calls out of a model's text, as it streams.

Each format turns the text so far into the content to show and the calls found, re-reading from
the start at every step (answers are short; the grammar keeps them well formed). A call's
arguments are the model's own JSON text, so what has been streamed of them is always a prefix of
what follows, and OpenAI's `arguments` fragments are plain slices of it.

Formats: `ArgsOnly` (a named `tool_choice`: the text is the arguments), `CallList` (`required`:
a JSON list of calls), `Generic` (`auto` where the template knows no tool format: llama.cpp's
`{"tool_calls": [...]}` or `{"response": "..."}`), and the families' own: `Hermes`
(`<tool_call>{...}</tool_call>`, Qwen and Hermes), `Llama3` (a bare `{"name", "parameters"}`
object, after `<|python_tag|>` or as the whole answer) and `Mistral` (`[TOOL_CALLS][...]`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from shared.jobs import ToolCallDelta

WS = " \t\r\n"
# Re-reading from the start each step stays cheap because the scans run in C: a string by
# str.find, a whole value by the json module.
_DECODER = json.JSONDecoder()


@dataclass
class Call:
    """One call as far as it has been read: `args` is raw JSON text, maybe still open."""

    name: str | None = None
    args: str = ""
    complete: bool = False


@dataclass
class Parsed:
    content: str = ""
    calls: list[Call] = field(default_factory=list)


class Format:
    """Reads the text so far; `final`: no more text will come."""

    def parse(self, text: str, final: bool) -> Parsed:
        raise NotImplementedError


class ArgsOnly(Format):
    def __init__(self, name: str) -> None:
        self.name = name

    def parse(self, text: str, final: bool) -> Parsed:
        start = _skip_ws(text, 0)
        end = _value_end(text, start, final)
        return Parsed(calls=[Call(self.name, text[start:end], end is not None)])


class CallList(Format):
    def parse(self, text: str, final: bool) -> Parsed:
        return Parsed(calls=_call_list(text, _skip_ws(text, 0), final))


class Generic(Format):
    def parse(self, text: str, final: bool) -> Parsed:
        i = _skip_ws(text, 0)
        if not text.startswith("{", i):
            return Parsed(content=text if final else "")
        j = _skip_ws(text, i + 1)
        key_end = _string_end(text, j) if text.startswith('"', j) else None
        if key_end is None:
            return Parsed()
        key = json.loads(text[j:key_end])
        j = _skip_ws(text, key_end)
        if not text.startswith(":", j):
            return Parsed()
        j = _skip_ws(text, j + 1)
        if key == "response" and text.startswith('"', j):
            return Parsed(content=_partial_string(text, j))
        if key in ("tool_calls", "tool_call"):
            if text.startswith("{", j):
                return Parsed(calls=[_call(text, j, final)])
            return Parsed(calls=_call_list(text, j, final))
        return Parsed()


class Hermes(Format):
    OPEN = "<tool_call>"

    def parse(self, text: str, final: bool) -> Parsed:
        first = text.find(self.OPEN)
        if first < 0:
            return _content(text, final, self.OPEN)
        out = Parsed(content=text[:first].rstrip(WS))
        at = first
        while at >= 0:
            out.calls.append(_call(text, _skip_ws(text, at + len(self.OPEN)), final))
            at = text.find(self.OPEN, at + len(self.OPEN))
        return _or_content(out, text, final)


class Llama3(Format):
    TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> Parsed:
        tagged = text.find(self.TAG)
        if tagged >= 0:
            out, at = Parsed(content=text[:tagged].rstrip(WS)), tagged + len(self.TAG)
        elif text.startswith("{", _skip_ws(text, 0)):
            out, at = Parsed(), 0
        else:
            return _content(text, final, self.TAG)
        at = _skip_ws(text, at)
        while text.startswith("{", at):  # one call, or several joined by ";"
            out.calls.append(_call(text, at, final))
            end = _value_end(text, at, final)
            if end is None:
                break
            at = _skip_ws(text, _skip(text, _skip_ws(text, end), ";"))
        return _or_content(out, text, final)


class Mistral(Format):
    TAG = "[TOOL_CALLS]"

    def parse(self, text: str, final: bool) -> Parsed:
        first = text.find(self.TAG)
        if first < 0:
            return _content(text, final, self.TAG)
        out = Parsed(content=text[:first].rstrip(WS),
                     calls=_call_list(text, _skip_ws(text, first + len(self.TAG)), final))
        return _or_content(out, text, final)


def _content(text: str, final: bool, tag: str) -> Parsed:
    """Text with no call in it yet: all of it at the end; before that, less what may still
    become the tag (and trailing space, which goes if a call follows)."""
    return Parsed(content=text if final else _hold_back(text, tag).rstrip(WS))


def _or_content(out: Parsed, text: str, final: bool) -> Parsed:
    """At the end, output that holds no named call is plain content, never an error."""
    if final and not any(c.name for c in out.calls):
        return Parsed(content=text)
    return out


class ToolStream:
    """One choice's text in, content and tool-call pieces out, as OpenAI streams them: a call's
    first piece carries its id and name with empty arguments, the later ones only arguments."""

    def __init__(self, fmt: Format, parallel: bool = True) -> None:
        self.format = fmt
        self.parallel = parallel
        self.text = ""
        self.content_sent = 0
        self.args_sent: list[int] = []  # per call started
        self.first_whole = False

    @property
    def called(self) -> bool:
        return bool(self.args_sent)

    @property
    def names_tool(self) -> bool:
        """The format only fills in a tool already chosen (a named `tool_choice`)."""
        return isinstance(self.format, ArgsOnly)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        self.text += text
        try:
            parsed = self.format.parse(self.text, final)
        except ValueError:  # a key or name that is not valid JSON: wait for more, or give up
            parsed = Parsed(content=self.text) if final else Parsed()
        content = parsed.content[self.content_sent:]
        self.content_sent = max(self.content_sent, len(parsed.content))
        pieces: list[ToolCallDelta] = []
        calls = [c for c in parsed.calls if c.name is not None]
        self.first_whole = bool(calls) and calls[0].complete
        for k, call in enumerate(calls if self.parallel else calls[:1]):
            if k == len(self.args_sent):
                pieces.append(ToolCallDelta(index=k, id=f"call_{uuid.uuid4().hex[:24]}",
                                            name=call.name))
                self.args_sent.append(0)
            if fragment := call.args[self.args_sent[k]:]:
                pieces.append(ToolCallDelta(index=k, arguments=fragment))
                self.args_sent[k] = len(call.args)
        return content, pieces

    @property
    def done(self) -> bool:
        """One call was asked for and it is whole: nothing after it matters."""
        return not self.parallel and self.first_whole


# Partial JSON: positions in text that may stop anywhere.


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in WS:
        i += 1
    return i


def _skip(s: str, i: int, char: str) -> int:
    return i + 1 if s.startswith(char, i) else i


def _string_end(s: str, i: int) -> int | None:
    """Past the closing quote of the string opening at s[i]; None if it is still open."""
    j = i + 1
    while (quote := s.find('"', j)) >= 0:
        escapes = quote - j - len(s[j:quote].rstrip("\\"))  # backslashes just before it
        if escapes % 2 == 0:
            return quote + 1
        j = quote + 1
    return None


def _value_end(s: str, i: int, final: bool) -> int | None:
    """Past the JSON value starting at s[i]; None if the text ends inside it (or it is not
    JSON: without a grammar a model may write anything)."""
    try:
        _, end = _DECODER.raw_decode(s, i)
    except ValueError:
        return None
    if end == len(s) and not final and s[i] not in '"{[':
        return None  # a number, say, that may go on
    return int(end)


def _partial_string(s: str, i: int) -> str:
    """The decoded text of the string opening at s[i], as far as it goes."""
    end = _string_end(s, i)
    raw = s[i + 1:end - 1] if end is not None else s[i + 1:]
    if end is None:
        cut = raw.rfind("\\")
        if cut >= 0 and (len(raw) - cut < 2 or (raw[cut + 1] == "u" and len(raw) - cut < 6)):
            raw = raw[:cut]  # an escape not yet whole
    try:
        return str(json.loads(f'"{raw}"'))
    except ValueError:
        return ""


def _call(s: str, i: int, final: bool) -> Call:
    """The `{"name": ..., "arguments" | "parameters": ...}` object at s[i]."""
    call = Call()
    if not s.startswith("{", i):
        return call
    j = i + 1
    while True:
        j = _skip_ws(s, j)
        if j >= len(s):
            return call
        if s[j] == "}":
            call.complete = True
            if not call.args:
                call.args = "{}"
            return call
        if s[j] == ",":
            j += 1
            continue
        key_end = _string_end(s, j) if s[j] == '"' else None
        if key_end is None:
            return call
        key = json.loads(s[j:key_end])
        j = _skip_ws(s, key_end)
        if not s.startswith(":", j):
            return call
        j = _skip_ws(s, j + 1)
        end = _value_end(s, j, final)
        if key in ("arguments", "parameters"):
            call.args = s[j:end] if end is not None else s[j:]
        elif key == "name" and end is not None:
            name = json.loads(s[j:end])
            call.name = name if isinstance(name, str) else None
        if end is None:
            return call
        j = end


def _call_list(s: str, i: int, final: bool) -> list[Call]:
    calls: list[Call] = []
    if not s.startswith("[", i):
        return calls
    j = _skip_ws(s, i + 1)
    while j < len(s) and s[j] == "{":
        calls.append(_call(s, j, final))
        end = _value_end(s, j, final)
        if end is None:
            break
        j = _skip_ws(s, _skip(s, _skip_ws(s, end), ","))
    return calls


def _hold_back(text: str, tag: str) -> str:
    """`text` less an end that may be the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return text[:-n]
    return text
