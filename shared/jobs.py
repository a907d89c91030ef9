"""The job a handler enqueues and the messages a worker streams back (wire version 1).

A job travels as arq's one keyword argument ``job`` (a plain dict, serialised with orjson).
Its messages are entries of a Redis Stream (``keys.stream(job_id)``), each a field ``m`` holding
one JSON message from a closed set:

- ``delta``  a piece of one choice's text (and its logprobs), or of one of its tool calls; the
             last one of a choice carries ``finish_reason``
- ``final``  the job is done; carries usage (and, for an embedding job, its vectors)
- ``error``  the job failed; carries an OpenAI-style error with its HTTP status

The stream's entry ids double as SSE event ids, so a client can resume with ``Last-Event-ID``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, Field, TypeAdapter

from shared.errors import WireError

WIRE_VERSION: Literal[1] = 1
# An interactive job's score in its model's queue is its time less this (~30 years), so arq,
# which takes the lowest score first, runs it ahead of every batch line (scored at its time).
AHEAD_MS = 10**12


class Sampling(BaseModel):
    """Sampling settings, named as llama-cpp-python's `create_completion` names them."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    stop: list[str] = []
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    logit_bias: dict[int, float] = {}
    ignore_eos: bool = False


class Reply(BaseModel):
    """Where the worker stores the finished answer: a thread, and the run that asked, if any."""

    thread_id: str
    owner: str
    message_id: str
    assistant_id: str | None = None
    run_id: str | None = None


class Tools(BaseModel):
    """The tools a chat job may call, and how: `choice` auto or required, or `forced` names the
    one tool to call (`tool_choice: none` sends no tools at all)."""

    functions: list[dict[str, Any]]  # OpenAI's `function` objects: name, description, parameters
    choice: Literal["auto", "required"] = "auto"
    forced: str | None = None
    parallel: bool = True

    @property
    def named(self) -> dict[str, Any] | None:
        return next((f for f in self.functions if f["name"] == self.forced), None)


class Route(BaseModel):
    """Where the handler sent a job (`functions.queue.route`): the worker, and why.

    ``hit``: the worker's caches held the longest start of the prompt (``blocks`` of it);
    ``miss``: none held more than another, so the least-loaded worker; ``busy``: the worker
    holding it ran past ``FERRY_ROUTE_MAX_LOAD``, so the least-loaded one instead."""

    worker: str
    decision: Literal["hit", "miss", "busy"]
    blocks: int = 0


class GenerationJob(BaseModel):
    """One chat or text completion request, as a worker runs it."""

    v: Literal[1] = WIRE_VERSION
    id: str
    model: str
    kind: Literal["chat", "text"]
    messages: list[dict[str, Any]] = []  # chat: OpenAI messages, content flattened to text
    prompts: list[str] = []  # text: one or more prompts, `n` choices each
    n: int = 1
    sampling: Sampling = Sampling()
    logprobs: int | None = None  # number of top alternatives; None: no logprobs
    json_schema: dict[str, Any] | None = None  # {} means any JSON object (json_object mode)
    tools: Tools | None = None
    reply: Reply | None = None  # store choice 0 as an assistant message before `final`
    keep_s: int | None = None  # how long its stream is kept once written (default stream_ttl_s)
    truncate: bool = False  # chat: drop the oldest turns until the prompt fits the context
    count_only: bool = False  # count the prompt's tokens (`final` usage), generate nothing
    clamp: bool = False  # max_tokens is a ceiling: held to the room the prompt leaves
    background: bool = False  # a batch line: behind every interactive job, in queue and engine
    notify: str | None = None  # a list the worker pushes the job's id to once its stream ended
    session: str | None = None  # a client's conversation key (prompt_cache_key, a thread, ...)
    prefixes: list[str] = []  # hashes of the prompt's starts (`shared.fleet.cache_map`)
    route: Route | None = None  # the worker the handler chose, when more than one serves

    @property
    def choice_count(self) -> int:
        return self.n * (len(self.prompts) if self.kind == "text" else 1)


class EmbeddingJob(BaseModel):
    """One `/v1/embeddings` request: each input a text or its token ids, embedded as one sequence."""

    v: Literal[1] = WIRE_VERSION
    id: str
    model: str
    kind: Literal["embed"] = "embed"
    inputs: list[str | list[int]]
    keep_s: int | None = None
    background: bool = False  # a batch line: queued behind every interactive job
    notify: str | None = None  # as `GenerationJob.notify`

    @property
    def choice_count(self) -> int:
        return len(self.inputs)


class Logprobs(BaseModel):
    """Completion-style logprobs for the tokens of one delta."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ToolCallDelta(BaseModel):
    """A piece of one tool call: its first carries `id` and `name`, later ones `arguments`."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def add_tool_call(calls: list[dict[str, Any]], piece: ToolCallDelta) -> None:
    """Fold one piece into `calls`, OpenAI's `tool_calls` list of one choice."""
    if piece.id is not None:
        calls.append({"id": piece.id, "type": "function",
                      "function": {"name": piece.name, "arguments": ""}})
    calls[piece.index]["function"]["arguments"] += piece.arguments


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused from an earlier request

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Delta(BaseModel):
    kind: Literal["delta"] = "delta"
    index: int
    text: str = ""
    tool_call: ToolCallDelta | None = None
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    stop_sequence: str | None = None  # with finish_reason stop: the stop string that ended it
    usage: Usage | None = None  # on a job's first delta: its prompt tokens, and those cached


class Final(BaseModel):
    kind: Literal["final"] = "final"
    usage: Usage
    # An embedding job's vectors in input order: little-endian float32, L2-normalised, base64.
    embeddings: list[str] = []


class Error(WireError):
    """The job failed, or was cancelled: the error as the handler raises it (`exception()`)."""

    kind: Literal["error"] = "error"


# The closed set a job's stream carries, told apart by `kind`.
StreamMessage = Annotated[Delta | Final | Error, Field(discriminator="kind")]
_message_adapter: TypeAdapter[Delta | Final | Error] = TypeAdapter(StreamMessage)


def cancel_value(after_s: float = 0) -> bytes:
    """What a job's cancel key holds: stop now, or at a time unless a reader comes back first
    (a dropped stream's grace period; the reader that resumes deletes the key)."""
    return b"1" if after_s <= 0 else f"at:{time.time() + after_s:.3f}".encode()


def is_cancelled(value: bytes | None) -> bool:
    """Whether a cancel key's value (None: no key) means the job stops now."""
    if value is None:
        return False
    return not value.startswith(b"at:") or float(value[3:]) <= time.time()


def entry_id(ms: int, n: int) -> str:
    """The stream entry id of a job's `n`-th message (from 1), written at `ms`: a worker names
    every entry, so a reader tells a gap (`entry_number`) and a write sent twice adds one entry."""
    return f"{ms}-{n}"


def entry_parts(entry: str | bytes) -> tuple[int, int]:
    """A stream entry id as (ms, sequence), the order Redis keeps; "5" is (5, 0)."""
    ms, _, seq = (entry.decode() if isinstance(entry, bytes) else entry).partition("-")
    return int(ms), int(seq or 0)


def entry_number(entry: str | bytes) -> int:
    """Which of its job's messages an entry id names (0: before the first)."""
    return entry_parts(entry)[1]


def encode(message: Delta | Final | Error) -> bytes:
    return orjson.dumps(message.model_dump(exclude_defaults=True) | {"kind": message.kind})


def decode(raw: bytes) -> Delta | Final | Error:
    return _message_adapter.validate_json(raw)
