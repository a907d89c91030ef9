"""A job as the scheduler holds it: a task with the job's id, its prompts, and how it ended.

As in llama.cpp's server, a request becomes a task and its results are a closed set: the stream's
messages (deltas, then a final one) go out through `Post`, and the scheduler sets the task's
`Outcome` as it hands out the last of them, for `Engine.run` to return.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from shared.jobs import Delta, Final, Usage

if TYPE_CHECKING:
    from workers.engine.choice import Choice


class Outcome(enum.Enum):
    """How a task ended."""

    COMPLETED = "completed"  # every choice finished, and `Final` went out last
    CANCELLED = "cancelled"  # the client left, the job timed out, or the worker stops
    FAILED = "failed"  # llama.cpp failed under it


@dataclass
class Group:
    """One prompt, decoded once, and the choices that continue it (at most `n_seq_max`)."""

    tokens: list[int]
    choices: list[Choice]
    max_tokens: int | None
    resumed: bool = False  # a paused batch line going on: its prompt is counted already


class Sink(Protocol):
    """Where a task's messages go (`workers.publish.JobOutput`); any thread may set `cancelled`
    to have the scheduler drop the task at its next step."""

    cancelled: bool


# How messages leave the scheduler thread: post(sink, messages, done). It must not block (the
# publisher's queue).
Post = Callable[[Any, list[Delta | Final], bool], None]


class Task:
    """A job inside the scheduler: its groups, and how far they have got."""

    def __init__(self, job_id: str, output: Sink, groups: list[Group],
                 background: bool = False, entries: tuple[str, ...] | list[str] = ()) -> None:
        self.job_id = job_id
        self.entries = tuple(entries)  # its prompt in cache maps: what its sequences will hold
        self.background = background  # a batch line: any interactive task starts first
        self.output = output
        self.waiting = list(groups)  # not started: too few free sequences so far
        self.busy = 0  # sequences working for this task
        self.usage = Usage()
        self.deltas: list[Delta] = []  # this step's messages
        self.started = False  # its first delta went out (that one carries the prompt usage)
        self.outcome: Outcome | None = None  # set when its last message is handed out

    @property
    def cancelled(self) -> bool:
        """Leave at the next step: the client left, the job timed out, or the worker stops."""
        return self.output.cancelled

    @property
    def finished(self) -> bool:
        return not self.waiting and not self.busy
