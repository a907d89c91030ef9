"""One of the context's sequences, as llama.cpp's server keeps a slot: an explicit state, the
tokens its KV cells hold, and the choice it is generating.

A sequence moves IDLE -> PROMPT -> GENERATING -> DONE -> IDLE. It stays in PROMPT while its
prompt is decoded chunk by chunk, or, as a sibling of an `n > 1` group, while it waits for the
group's first sequence to decode the shared prompt. It is DONE for the rest of the step in which
its choice ends, and the scheduler releases it at the end of that step. An IDLE sequence keeps
its cells: `cache` is what they hold, for a later prompt that starts the same way.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.engine.choice import Choice, Vocab
    from workers.engine.task import Group, Task


class State(enum.Enum):
    IDLE = "idle"  # free; its cells may still serve a prompt that starts like them
    PROMPT = "prompt"  # decoding its prompt, or a sibling waiting for the shared prompt
    GENERATING = "generating"  # `next` is sampled, to be decoded in the next step
    DONE = "done"  # its choice ended this step; released at the end of the step


class Sequence:
    """One KV sequence of the context and the choice it works for."""

    def __init__(self, seq_id: int) -> None:
        self.id = seq_id
        self.state = State.IDLE
        self.cache: list[int] = []  # what its KV cells hold, position by position
        self.entries: tuple[str, ...] = ()  # `cache`'s prompt, as cache map entries
        self.copied = False  # host memory holds a copy of `cache` (made while nothing ran)
        self.last_used = 0.0  # monotonic time its last choice ended
        self.row = -1  # batch row holding its logits after a decode; -1: none this step
        self.task: Task | None = None
        self.group: Group | None = None
        self.choice: Choice | None = None
        self.todo: list[int] = []  # prompt tokens still to decode (a group's first sequence)
        self.siblings: list[Sequence] = []  # wait for this one's prompt, then copy its cells
        self.next = -1  # GENERATING: the token to decode next
        self.generated = 0  # tokens sampled for its choice

    @property
    def active(self) -> bool:
        """Working for a task: in PROMPT or GENERATING."""
        return self.state is State.PROMPT or self.state is State.GENERATING

    def start(self, task: Task, group: Group, choice: Choice) -> None:
        self.state = State.PROMPT
        self.task, self.group, self.choice = task, group, choice
        self.entries = task.entries
        self.copied = False  # its cells change from here
        task.busy += 1

    def sampled(self, token: int, vocab: Vocab, n_ctx: int) -> None:
        """Hand the token sampled from `row` to the choice: DONE if that ends it, else the
        token is decoded in the next step. The choice may have no more tokens once it has
        `max_tokens`, or once this one would fill the context."""
        assert self.choice is not None and self.group is not None and self.task is not None
        self.generated += 1
        limit = self.group.max_tokens
        length = (limit is not None and self.generated >= limit) or len(self.cache) + 1 >= n_ctx
        if self.choice.accept(token, self.row, vocab, self.task, length):
            self._done()
        else:
            self.state, self.next = State.GENERATING, token

    def end(self, reason: str) -> None:
        """End the choice now, with `reason` (the KV cache is full: `length`)."""
        assert self.choice is not None and self.task is not None
        self.choice.finish(reason, "", self.task)
        self._done()

    def leave(self) -> None:
        """Its task lets go of it (cancelled, or a batch line paused): free it at once, keeping
        its cells, sending nothing more."""
        assert self.task is not None
        self.task.busy -= 1
        self.last_used = time.monotonic()
        self.release()

    def release(self) -> None:
        """Back to IDLE, keeping its cells."""
        self.state = State.IDLE
        self.task = self.group = self.choice = None
        self.todo, self.siblings, self.next, self.generated = [], [], -1, 0

    def _done(self) -> None:
        assert self.task is not None
        self.state = State.DONE
        self.task.busy -= 1
        self.last_used = time.monotonic()  # when it finished, as the LRU order expects
