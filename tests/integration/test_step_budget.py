"""What one decode step carries of batch lines' prompts: the scheduler on the real model, in this
process, with every step's batch recorded as it is built.

Lines' prompts keep within what the engine decodes in `STEP_S` (at least `LINE_PROMPT_TOKENS`),
so an interactive job never waits for a step as long as many lines' prompts together; the very
first step, before any time was measured, may fill `n_batch`. While an interactive job is in,
they get only what is left of `STEP_S` (at least `HELD_PROMPT_TOKENS`). Interactive prompts are
never held back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from llama_cpp._internals import LlamaModel, LlamaSampler

from tests.helpers import engine_context, smollm_in_process
from workers.engine.choice import Choice
from workers.engine.scheduler import (
    HELD_PROMPT_TOKENS,
    LINE_PROMPT_TOKENS,
    STEP_S,
    Scheduler,
)
from workers.engine.sequence import Sequence, State
from workers.engine.task import Group, Task
from workers.engine.textstream import TextStream

SEQUENCES, INTERACTIVE = 6, 3


class Answer:
    def __init__(self) -> None:
        self.cancelled = False
        self.done = threading.Event()


def post(answer: Any, messages: Any, done: bool) -> None:
    if done:
        answer.done.set()


class Recording(Scheduler):
    """Records, for every step: the time per token measured before it, whether an interactive job
    held the lines back, the lines' prompt tokens in it, its interactive prompt tokens, and its
    sequences generating."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.steps: list[tuple[float, bool, int, int, int]] = []
        super().__init__(*args, **kwargs)

    def _fill_batch(self) -> list[tuple[Sequence, list[int]]]:
        token_s, held = self.token_s, time.monotonic() < self.held_until
        rows = super()._fill_batch()
        prompts = [(seq.task is not None and seq.task.background, len(tokens))
                   for seq, tokens in rows if seq.state is State.PROMPT]
        generating = sum(seq.state is State.GENERATING for seq, _ in rows)
        self.steps.append((token_s, held, sum(n for line, n in prompts if line),
                           sum(n for line, n in prompts if not line), generating))
        return rows


@pytest.fixture(scope="module")
def model() -> Iterator[LlamaModel]:
    with smollm_in_process() as m:
        yield m


@pytest.fixture
def scheduler(model: LlamaModel) -> Iterator[Recording]:
    ctx = engine_context(model, 2048, 512, SEQUENCES)
    s = Recording(model, ctx, 2048, post, interactive=INTERACTIVE)
    try:
        yield s
    finally:
        s.close()
        ctx.close()


def task(model: LlamaModel, name: str, text: str, max_tokens: int, background: bool) -> Task:
    tokens = model.tokenize(text.encode(), add_bos=True, special=True)
    chain = LlamaSampler()
    chain.add_greedy()
    return Task(name, Answer(), [Group(tokens, [Choice(0, chain, TextStream([]), None)],
                                       max_tokens)], background=background)


def lines(model: LlamaModel, count: int) -> list[Task]:
    """Batch lines of ~100-token prompts, each its own (nothing cached for another)."""
    story = "The keeper climbed the lighthouse stairs as the storm came in from the sea. " * 6
    return [task(model, f"line-{i}", f"Line {i}. {story}", 4, True) for i in range(count)]


def run(s: Recording, tasks: list[Task]) -> None:
    for t in tasks:
        s.submit(t)
    for t in tasks:
        assert t.output.done.wait(120), t.job_id


def test_a_step_carries_what_the_engine_decodes_in_step_s_of_lines_prompts(
        scheduler: Recording, model: LlamaModel) -> None:
    run(scheduler, [task(model, "warm-up", "Hello", 2, True)])
    run(scheduler, lines(model, SEQUENCES))
    measured = [step for step in scheduler.steps if step[0]]
    assert not any(held for _, held, _, _, _ in measured)
    room = [max(LINE_PROMPT_TOKENS, generating, int(STEP_S / token_s))
            for token_s, _, _, _, generating in measured]
    carried = [n for _, _, n, _, _ in measured]
    pairs = list(zip(carried, room, strict=True))
    assert all(n <= r for n, r in pairs), pairs
    # On this machine that holds the lines back: their prompts (~100 tokens each, 6 of them)
    # went over many steps, not one or two.
    if max(room) < 2 * 100:
        assert sum(carried) > SEQUENCES * 90 and sum(carried) > 4 * max(carried)


def test_beside_an_interactive_job_lines_get_what_is_left_of_step_s(
        scheduler: Recording, model: LlamaModel) -> None:
    run(scheduler, [task(model, "warm-up", "Hello", 2, True)])
    chat = task(model, "chat", "Tell me about the sea.", 48, False)
    scheduler.submit(chat)
    run(scheduler, lines(model, SEQUENCES))
    assert chat.output.done.wait(60)
    held = [(n, max(HELD_PROMPT_TOKENS, int(STEP_S / token_s) - generating - chat_prompt))
            for token_s, was_held, n, chat_prompt, generating in scheduler.steps
            if token_s and was_held and n]
    assert held, scheduler.steps  # lines' prompts went in while the chat was in
    assert all(n <= room for n, room in held), held
    assert min(room for _, room in held) < LINE_PROMPT_TOKENS  # tighter than without the chat


def test_an_interactive_prompt_is_never_held_back(scheduler: Recording, model: LlamaModel) -> None:
    run(scheduler, [task(model, "warm-up", "Hello", 2, False)])
    long = "Tell me about the sea, the ships and the storms of the northern coast. " * 20
    run(scheduler, [task(model, "chat", long, 2, False)])
    prompt = len(model.tokenize(long.encode(), add_bos=True, special=True))
    assert prompt > 2 * LINE_PROMPT_TOKENS
    assert max(n for _, _, _, n, _ in scheduler.steps) == prompt  # one step, all of it
