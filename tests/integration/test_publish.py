"""The worker's publisher: what piles up between two writes goes out as one delta per choice."""

from __future__ import annotations

import asyncio
import time
import uuid

import redis

from shared import keys
from shared.jobs import Delta, Final, Logprobs, ToolCallDelta, Usage, decode
from workers.publish import JobOutput, Publisher, coalesce


def lp(*tokens: tuple[str, int]) -> Logprobs:
    """Logprobs of (token, text offset) pairs."""
    return Logprobs(tokens=[t for t, _ in tokens], token_logprobs=[-1.0] * len(tokens),
                    top_logprobs=[None] * len(tokens), text_offset=[o for _, o in tokens])


def test_each_choice_text_and_logprobs_join_in_order() -> None:
    out = coalesce([Delta(index=0, text="Hel", logprobs=lp(("Hel", 0))), Delta(index=1, text="A"),
                    Delta(index=0, text="lo", logprobs=lp(("lo", 3))), Delta(index=1, text="B"),
                    Delta(index=0, text="!", finish_reason="stop")])
    assert out == [Delta(index=0, text="Hello!", logprobs=lp(("Hel", 0), ("lo", 3)), finish_reason="stop"),
                   Delta(index=1, text="AB")]


def test_a_tool_call_a_finish_and_the_end_keep_their_place() -> None:
    call = ToolCallDelta(index=0, id="call_1", name="f")
    final = Final(usage=Usage(completion_tokens=4))
    messages = [Delta(index=0, text="a"), Delta(index=0, tool_call=call),
                Delta(index=0, text="b"), Delta(index=0, text="c", finish_reason="tool_calls"),
                final]
    assert coalesce(messages) == [Delta(index=0, text="a"), Delta(index=0, tool_call=call),
                                  Delta(index=0, text="bc", finish_reason="tool_calls"), final]
    # Nothing joins a finished choice, or text across the end.
    done = [Delta(index=0, text="x", finish_reason="length"), Delta(index=0, text="y")]
    assert coalesce(done) == done
    assert coalesce([Delta(index=0, text="x"), final, Delta(index=0, text="y")]) == [
        Delta(index=0, text="x"), final, Delta(index=0, text="y")]


def test_steps_queued_between_writes_reach_redis_as_one_entry(redis_url: str) -> None:
    """Real Redis: the first token goes alone (time to first token), the next steps of the
    interval together as one entry, the last step at once."""
    client = redis.Redis.from_url(redis_url)
    publisher = Publisher(client, ttl_s=60, interval_s=0.3)
    loop = asyncio.new_event_loop()
    try:
        answer = JobOutput(f"test-{uuid.uuid4().hex}", hold_final=False, loop=loop)
        publisher.post(answer, [Delta(index=0, text="one")], False)
        deadline = time.monotonic() + 5
        while not client.xlen(keys.stream(answer.job_id)) and time.monotonic() < deadline:
            time.sleep(0.01)
        for word in (" two", " three", " four"):
            publisher.post(answer, [Delta(index=0, text=word)], False)
        publisher.post(answer, [Delta(index=0, text=" five", finish_reason="stop"),
                                Final(usage=Usage(completion_tokens=5))], True)
        loop.run_until_complete(asyncio.wait_for(answer.done, 5))
        entries = [decode(f[b"m"]) for _, f in client.xrange(keys.stream(answer.job_id))]
        assert entries == [Delta(index=0, text="one"),
                           Delta(index=0, text=" two three four five", finish_reason="stop"),
                           Final(usage=Usage(completion_tokens=5))]
        assert answer.text == "one two three four five"
    finally:
        publisher.close()
        loop.close()
        client.close()


def test_the_middle_waits_two_steps_when_steps_are_long(redis_url: str) -> None:
    """8 streams on 2 cores step every ~45 ms: a write every 50 ms would carry one token."""
    client = redis.Redis.from_url(redis_url)
    publisher = Publisher(client, ttl_s=60, interval_s=0.05)
    loop = asyncio.new_event_loop()
    try:
        answer = JobOutput(f"test-{uuid.uuid4().hex}", hold_final=False, loop=loop)
        assert publisher._cadence() == 0.05

        def step(seconds: float) -> None:
            answer.posted_at = time.monotonic() - seconds
            publisher.post(answer, [], False)

        step(0.045)
        assert 0.089 < publisher._cadence() < 0.1
        for _ in range(40):
            step(0.008)  # one stream: the interval holds
        assert publisher._cadence() == 0.05
        for _ in range(40):
            step(2.0)  # a long prompt in the way: stretched 4 times at most
        assert publisher._cadence() == 0.2
    finally:
        publisher.close()
        loop.close()
        client.close()
