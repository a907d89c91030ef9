"""Idle sequences' caches in host memory: the scheduler on the real model, in this process.

What the HTTP tests cannot see is where the cells are: these look into the context with
`llama_memory_seq_pos_max` (-1: the sequence holds no cells).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import llama_cpp
import pytest
from llama_cpp._internals import LlamaModel, LlamaSampler

from shared.jobs import Delta, Final
from tests.helpers import engine_context, smollm_in_process
from workers.engine.choice import Choice
from workers.engine.prefix_cache import common_prefix
from workers.engine.scheduler import Scheduler
from workers.engine.task import Group, Task
from workers.engine.textstream import TextStream


class Collected:
    """Collects one task's messages, as the publisher's `JobOutput` would receive them."""

    def __init__(self) -> None:
        self.cancelled = False
        self.text = ""
        self.final: Final | None = None
        self.done = threading.Event()


def post(answer: Any, messages: Any, done: bool) -> None:
    for m in messages:
        if isinstance(m, Delta):
            answer.text += m.text
        elif isinstance(m, Final):
            answer.final = m
    if done:
        answer.done.set()


@pytest.fixture(scope="module")
def model() -> Iterator[LlamaModel]:
    with smollm_in_process() as m:
        yield m


@contextmanager
def scheduler(model: LlamaModel, host_bytes: int, parallel: int = 4) -> Iterator[Scheduler]:
    ctx = engine_context(model, 1024, 64, parallel)
    s = Scheduler(model, ctx, 1024, post, host_bytes=host_bytes)
    try:
        yield s
    finally:
        s.close()
        ctx.close()


def generate(s: Scheduler, model: LlamaModel, prompt: str) -> Collected:
    tokens = model.tokenize(prompt.encode(), add_bos=True, special=True)
    chain = LlamaSampler()
    chain.add_greedy()
    answer = Collected()
    s.submit(Task("job-test", answer, [Group(tokens, [Choice(0, chain, TextStream([]), None)], 6)]))
    assert answer.done.wait(60)
    assert answer.final is not None
    return answer


def held(s: Scheduler, tokens: list[int]) -> None:
    """Wait until host memory holds a copy starting with `tokens` (idle caches are copied when
    the scheduler has nothing to run, just after the last answer went out)."""
    assert s.host is not None
    deadline = time.monotonic() + 10
    while not any(e.tokens[:len(tokens)] == tokens for e in s.host.entries):
        assert time.monotonic() < deadline, "never copied to host memory"
        time.sleep(0.01)


def cells(s: Scheduler) -> list[int]:
    """Each sequence's highest position in the context, -1 where it holds none."""
    return [llama_cpp.llama_memory_seq_pos_max(s.memory, q.id) for q in s.seqs]


A = "A long first prompt about lighthouses, ships, storms and the keepers of the coast, " * 3
B = "Something else entirely: a recipe for bread."


def test_idle_sequences_leave_the_context_and_come_back(model: LlamaModel) -> None:
    with scheduler(model, host_bytes=64 << 20) as s:
        first = generate(s, model, A)
        # Nothing else runs: a copy goes to host memory, the cells stay in the context.
        held(s, model.tokenize(A.encode(), add_bos=True, special=True))
        assert sum(p >= 0 for p in cells(s)) == 1
        generate(s, model, B)
        # B's start moved A's sequence out: only B's cells are in the context.
        assert sum(p >= 0 for p in cells(s)) == 1
        # A's prompt and 5 of its tokens (the 6th was never decoded) are in host memory.
        assert first.final.usage.prompt_tokens + 5 in [len(e.tokens) for e in s.host.entries]
        again = generate(s, model, A)
        # A came back from host memory: only its last prompt token was decoded again.
        assert again.final.usage.cached_tokens == first.final.usage.prompt_tokens - 1
        assert again.text == first.text
        assert sum(p >= 0 for p in cells(s)) == 1  # B's moved out in turn


def test_more_conversations_stay_cached_than_the_context_has_sequences(model: LlamaModel) -> None:
    with scheduler(model, host_bytes=64 << 20, parallel=2) as s:
        prompts = [f"Conversation {i}: {A}" for i in range(5)]
        firsts = [generate(s, model, p) for p in prompts]
        for p, first in zip(prompts, firsts, strict=True):
            again = generate(s, model, p)
            assert again.final.usage.cached_tokens == first.final.usage.prompt_tokens - 1
            assert again.text == first.text


def test_a_shared_system_prompt_is_reused_without_costing_the_conversation(
        model: LlamaModel) -> None:
    with scheduler(model, host_bytes=64 << 20) as s:
        system = "You are a keeper of lighthouses and answer in one word. " * 4
        one = generate(s, model, system + "First question: what do you keep?")
        two = generate(s, model, system + "Second question, about ships and their sails?")
        shared = len(model.tokenize(system.encode(), add_bos=True, special=True))
        # The second reuses the first's system prompt from its sequence...
        assert two.final.usage.cached_tokens >= shared - 2
        # ...and the first conversation is still cached whole (a copy went to host memory).
        again = generate(s, model, system + "First question: what do you keep?")
        assert again.final.usage.cached_tokens == one.final.usage.prompt_tokens - 1
        assert again.text == one.text


def test_without_host_memory_idle_sequences_stay(model: LlamaModel) -> None:
    with scheduler(model, host_bytes=0) as s:
        generate(s, model, A)
        generate(s, model, B)
        assert sum(p >= 0 for p in cells(s)) == 2
        assert s.host is None


def test_the_oldest_entries_go_when_host_memory_is_full(model: LlamaModel) -> None:
    with scheduler(model, host_bytes=64 << 20, parallel=2) as s:
        zero, one = (model.tokenize(f"{w}. {A}".encode(), add_bos=True, special=True)
                     for w in ("Zero", "One"))
        generate(s, model, "Zero. " + A)
        held(s, zero)  # copied while nothing ran
        s.host.limit = s.host.size * 3 // 2  # room for one entry of that size
        generate(s, model, "One. " + A)
        held(s, one)  # One's copy pushed Zero out
        assert len(s.host.entries) == 1 and s.host.size <= s.host.limit


def test_common_prefix_against_a_plain_loop() -> None:
    def plain(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    rng = random.Random(7)
    for _ in range(5000):
        a = [rng.randint(0, 3) for _ in range(rng.randint(0, 40))]
        b = a[:rng.randint(0, len(a))] + [rng.randint(0, 3) for _ in range(rng.randint(0, 10))]
        assert common_prefix(a, b) == common_prefix(b, a) == plain(a, b)
