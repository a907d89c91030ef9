"""Prompt-start hashes: a conversation's next turn shares its earlier turn's hashes, and only those."""

from __future__ import annotations

from shared.fleet import cache_map
from shared.jobs import GenerationJob, Tools


def chat(*contents: str, **fields: object) -> GenerationJob:
    messages = [{"role": "system" if i == 0 else "user" if i % 2 else "assistant", "content": c}
                for i, c in enumerate(contents)]
    return GenerationJob(id="j", model="m", kind="chat", messages=messages, **fields)  # type: ignore[arg-type]


def test_a_longer_history_extends_the_chain() -> None:
    turn1 = cache_map.prefix_hashes(chat("sys", "hello"))
    turn2 = cache_map.prefix_hashes(chat("sys", "hello", "hi there", "and you?"))
    assert len(turn1) == 2 and len(turn2) == 4
    assert turn2[:2] == turn1
    assert cache_map.longest([h in set(turn1) for h in turn2], turn2) == 2


def test_the_same_message_after_a_different_start_differs() -> None:
    a = cache_map.prefix_hashes(chat("sys A", "hello"))
    b = cache_map.prefix_hashes(chat("sys B", "hello"))
    assert not set(a) & set(b)


def test_model_and_tools_are_part_of_the_start() -> None:
    plain = cache_map.prefix_hashes(chat("sys", "hello"))
    other_model = cache_map.prefix_hashes(chat("sys", "hello").model_copy(update={"model": "n"}))
    tools = Tools(functions=[{"name": "f", "parameters": {"type": "object"}}])
    with_tools = cache_map.prefix_hashes(chat("sys", "hello", tools=tools))
    assert len({plain[0], other_model[0], with_tools[0]}) == 3


def test_a_text_prompt_hashes_its_whole_blocks() -> None:
    block = cache_map.BLOCK_CHARS
    job = GenerationJob(id="j", model="m", kind="text", prompts=["x" * (2 * block + 10)])
    longer = GenerationJob(id="j", model="m", kind="text", prompts=["x" * (3 * block)])
    assert len(cache_map.prefix_hashes(job)) == 2  # the part block is left out
    assert cache_map.prefix_hashes(longer)[:2] == cache_map.prefix_hashes(job)


def test_a_session_entry_never_equals_a_prefix() -> None:
    job = chat("sys", "hello", session="abc")
    job.prefixes = cache_map.prefix_hashes(job)  # as the handler sets them
    entries = cache_map.job_entries(job)
    assert entries[-1] == cache_map.session_hash("abc") and entries[-1].startswith("s")
    assert len(entries) == 3
