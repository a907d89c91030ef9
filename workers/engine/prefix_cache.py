"""Idle sequences' KV cache, kept in host memory (llama-server's `--cache-ram` with idle slots).

A context's sequences share one KV cache, and every decode step attends over every cell in use up
to the highest, an idle sequence's cells too: on 2 cores, seven idle sequences of 150 tokens slow
a lone stream by 10-15%. So when a job starts, the scheduler moves the idle sequences' caches out
here, and a prompt that starts like one of them gets a copy back instead of decoding that start
again. More conversations stay cached than the context has sequences, and a prompt may reuse the
system prompt of a conversation without costing that conversation its cache. The least recently
used entries go first when it is full.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp

FLAGS = 0  # LLAMA_STATE_SEQ_FLAGS_NONE: the whole sequence


@dataclass
class Entry:
    tokens: list[int]  # what the saved cells hold, position by position
    data: ctypes.Array[ctypes.c_uint8]


class HostCache:
    def __init__(self, ctx: llama_cpp.llama_context_p, limit_bytes: int) -> None:
        self.ctx = ctx
        self.limit = limit_bytes
        self.entries: list[Entry] = []  # oldest first

    @property
    def size(self) -> int:
        return sum(len(e.data) for e in self.entries)

    def save(self, seq_id: int, tokens: list[int]) -> None:
        """Copy sequence `seq_id`'s cells (holding `tokens`) out, unless an entry holds them
        already or they would not fit; entries they extend go."""
        n = len(tokens)
        if not tokens or any(e.tokens[:n] == tokens for e in self.entries):
            return
        size = llama_cpp.llama_state_seq_get_size_ext(self.ctx, seq_id, FLAGS)
        if size > self.limit:
            return
        self.entries = [e for e in self.entries if tokens[:len(e.tokens)] != e.tokens]
        while self.entries and self.size + size > self.limit:
            self.entries.pop(0)
        data = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data_ext(self.ctx, data, size, seq_id, FLAGS) == size:
            self.entries.append(Entry(list(tokens), data))

    def find(self, tokens: list[int], better_than: int) -> Entry | None:
        """The entry sharing the longest start with `tokens`, if that is more than `better_than`
        tokens and a sixteenth of the entry at least (a copy costs far less than decoding the
        tokens it saves, but not nothing); it stays, as the most recently used."""
        best, most = None, better_than
        for entry in self.entries:
            common = common_prefix(entry.tokens, tokens)
            if common > most and 16 * common >= len(entry.tokens):
                best, most = entry, common
        if best is not None:
            self.entries.remove(best)
            self.entries.append(best)
        return best

    def restore(self, entry: Entry, seq_id: int) -> bool:
        """Copy `entry`'s cells into sequence `seq_id`, in place of what it holds."""
        n = llama_cpp.llama_state_seq_set_data_ext(self.ctx, entry.data, len(entry.data), seq_id,
                                                   FLAGS)
        return n == len(entry.data)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share: a binary search over slice comparisons, which
    run in C (4,000 tokens: 0.03 ms, a Python loop 0.12 ms; a job's start compares its prompt
    with every idle sequence and every entry)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    same, differs = 0, n  # a[:same] == b[:same] and a[:differs] != b[:differs]
    while differs - same > 1:
        mid = (same + differs) // 2
        if a[same:mid] == b[same:mid]:
            same = mid
        else:
            differs = mid
    return same
