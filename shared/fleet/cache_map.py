"""What each worker's prompt caches hold, as hashes of prompt starts: a worker keeps its map in
Redis, and a handler reads the maps to send a chat's next turn where its history is cached.

A web process holds no tokenizer and no chat template, so a prompt's blocks here are what the job
carries, not tokens: a chat's messages one by one (after a block for the model and its tools), a
text prompt's 256-character pieces. Each block's hash covers every block before it (a chain), so
one hash stands for a whole start of the prompt, and the longest start a worker holds is the last
of the prompt's hashes in its map. A client that resends its history resends the same blocks, so
its next turn finds the worker whose caches hold all but the new ones.

A worker adds a job's hashes when it takes the job, and replaces its whole map with what its
sequences and host cache still hold at each heartbeat; the map expires with the heartbeat, so a
dead worker's map goes with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import orjson

from shared import keys
from shared.jobs import GenerationJob

BLOCK_CHARS = 256  # a text prompt's block
MAX_BLOCKS = 512  # hashes kept of one prompt: its first blocks


def prefix_hashes(job: GenerationJob) -> list[str]:
    """The chain of hashes of `job`'s prompt blocks (its first prompt's, for a text job)."""
    tools = job.tools.functions if job.tools else None
    seed = orjson.dumps([job.model, job.kind, tools, job.json_schema], option=orjson.OPT_SORT_KEYS)
    if job.kind == "chat":
        blocks: Iterable[bytes] = (orjson.dumps(m, option=orjson.OPT_SORT_KEYS)
                                   for m in job.messages[:MAX_BLOCKS])
    else:
        text = job.prompts[0] if job.prompts else ""
        whole = len(text) // BLOCK_CHARS  # a part block would change as the prompt grows
        blocks = (text[i * BLOCK_CHARS:(i + 1) * BLOCK_CHARS].encode()
                  for i in range(min(whole, MAX_BLOCKS)))
    chain, last = [], _hash(seed)
    for block in blocks:
        last = _hash(last + block)
        chain.append(last)
    return [h.hex() for h in chain]


def session_hash(session: str) -> str:
    """A client's conversation key as a map entry (it never equals a prefix hash)."""
    return "s" + _hash(session.encode()).hex()


def job_entries(job: GenerationJob) -> list[str]:
    """What a worker running `job` adds to its map."""
    return job.prefixes + ([session_hash(job.session)] if job.session else [])


def add(pipe: Any, model: str, worker_id: str, entries: list[str], ttl_s: float) -> None:
    """Queue on `pipe`: `entries` join the worker's map, which lives `ttl_s` more."""
    if entries:
        pipe.sadd(keys.cache_map(model, worker_id), *entries)
    pipe.pexpire(keys.cache_map(model, worker_id), int(ttl_s * 1000))


def replace(pipe: Any, model: str, worker_id: str, entries: set[str], ttl_s: float) -> None:
    """Queue on `pipe` (a transaction): the worker's map becomes `entries`."""
    pipe.delete(keys.cache_map(model, worker_id))
    add(pipe, model, worker_id, sorted(entries), ttl_s)


def longest(found: list[int], prefixes: list[str]) -> int:
    """How many of the prompt's blocks a map holds, from SMISMEMBER's answer over `prefixes`."""
    for i in range(len(prefixes) - 1, -1, -1):
        if found[i]:
            return i + 1
    return 0


def _hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()
