"""Idle sequences' KV cache, kept in host memory (llama-server's `--cache-ram` with idle slots).

A context's sequences share one KV cache, and every decode step attends over every cell in use up
to the highest, an idle sequence's cells too: on 2 cores, seven idle sequences of 150 tokens slow
a lone stream by 10-15%. So when a job starts, the scheduler moves the idle sequences' caches out
here, and a prompt that starts like one of them gets a copy back instead of decoding that start
again. More conversations stay cached than the context has sequences, and a prompt may reuse the
system prompt of a conversation without costing that conversation its cache. The least recently
used entries go first when it is full.

`PrefixCache` is the policy over it, and makes every `llama_memory` call of the scheduler: which
free sequence a prompt goes to, what it keeps of its cells, when idle cells move out.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp
from llama_cpp._internals import LlamaContext, LlamaModel

from workers.engine.sequence import Sequence, State

FLAGS = 0  # LLAMA_STATE_SEQ_FLAGS_NONE: the whole sequence


@dataclass
class Entry:
    tokens: list[int]  # what the saved cells hold, position by position
    data: ctypes.Array[ctypes.c_uint8]
    entries: tuple[str, ...] = ()  # their prompt, as cache map entries


class HostCache:
    """Saved copies of sequences' cells, oldest first, within `limit_bytes`."""

    def __init__(self, ctx: llama_cpp.llama_context_p, limit_bytes: int) -> None:
        self.ctx = ctx
        self.limit = limit_bytes
        self.entries: list[Entry] = []  # oldest first

    @property
    def size(self) -> int:
        return sum(len(e.data) for e in self.entries)

    def save(self, seq_id: int, tokens: list[int], entries: tuple[str, ...] = ()) -> None:
        """Copy sequence `seq_id`'s cells (holding `tokens`, the prompt of cache map `entries`)
        out, unless an entry holds them already or they would not fit; entries they extend go."""
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
            self.entries.append(Entry(list(tokens), data, entries))

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


class PrefixCache:
    """Where each prompt goes, and where idle sequences' cells live: in the context, or with
    `host_bytes`, moved out to host memory while other sequences generate."""

    def __init__(self, model: LlamaModel, ctx: LlamaContext, host_bytes: int) -> None:
        self.memory = llama_cpp.llama_get_memory(ctx.ctx)
        self.n_swa = llama_cpp.llama_model_n_swa(model.model)
        self.host = HostCache(ctx.ctx, host_bytes) if host_bytes else None

    def place(self, tokens: list[int], free: list[Sequence]) -> tuple[Sequence, int]:
        """The free sequence to decode `tokens` on, its cells cut back to the start of them it
        holds (brought back from host memory where a copy there holds more), and how many of
        `tokens` that start is."""
        seq = max(free, key=lambda s: self._worth(s, tokens))
        if self.host is not None:
            self._bring_back(seq, tokens)
        keep = self._reusable(seq, tokens)
        if not llama_cpp.llama_memory_seq_rm(self.memory, seq.id, keep, -1):
            llama_cpp.llama_memory_seq_rm(self.memory, seq.id, -1, -1)
            keep = 0
        del seq.cache[keep:]
        return seq, keep

    def copy(self, source: Sequence, to: Sequence) -> None:
        """Give `to` `source`'s cells: an `n > 1` group's prompt, decoded once."""
        llama_cpp.llama_memory_seq_cp(self.memory, source.id, to.id, -1, -1)
        to.cache, to.entries = list(source.cache), source.entries

    def evict(self, seq: Sequence) -> None:
        """Empty `seq`'s cells, keeping a copy in host memory if there is one."""
        if self.host is not None and seq.cache:
            self.host.save(seq.id, seq.cache, seq.entries)
        self.drop(seq)

    def drop(self, seq: Sequence) -> None:
        """Empty `seq`'s cells, keeping nothing."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq.id, -1, -1)
        seq.cache = []
        seq.entries = ()

    def evict_idle(self, seqs: list[Sequence]) -> None:
        """A job started: move the idle sequences' cells to host memory, before the new prompts
        take cells and while a copy made with nothing running may already be there. Without
        host memory they stay."""
        if self.host is not None:
            self.clear_idle(seqs)

    def clear_idle(self, seqs: list[Sequence]) -> bool:
        """Empty every idle sequence's cells (no room in the KV cache); whether there were any."""
        idle = [s for s in seqs if s.state is State.IDLE and s.cache]
        for seq in idle:
            self.evict(seq)
        return bool(idle)

    def copy_idle(self, seqs: list[Sequence]) -> None:
        """With nothing to run, copy the idle caches to host memory now, so that the next job's
        start only drops them: a copy into fresh memory costs 2.4 ms for 150 tokens of SmolLM2
        here, on the decode thread, before the new prompt."""
        if self.host is None:
            return
        for seq in seqs:
            if seq.state is State.IDLE and seq.cache and not seq.copied:
                self.host.save(seq.id, seq.cache, seq.entries)
                seq.copied = True

    def clear(self, seqs: list[Sequence]) -> None:
        """Empty the whole context (llama.cpp failed: what its cells hold is not known)."""
        llama_cpp.llama_memory_clear(self.memory, True)
        for seq in seqs:
            seq.cache = []
            seq.entries = ()

    def cache_entries(self, seqs: list[Sequence]) -> set[str]:
        """The cache map entries of every prompt the sequences and host memory hold (read from
        another thread: a moment's view)."""
        held = {e for seq in list(seqs) if seq.cache for e in seq.entries}
        for entry in list(self.host.entries) if self.host is not None else []:
            held.update(entry.entries)
        return held

    def _worth(self, seq: Sequence, tokens: list[int]) -> tuple[int, float]:
        """How good `seq` is for `tokens`: the cached tokens it reuses (among equals, the least
        recently used). Without host memory what it throws away is lost, so that counts twice
        against it: a shared system prompt does not take a live conversation's cache."""
        common = common_prefix(seq.cache, tokens)
        if self.host is None:
            common = max(common - 2 * (len(seq.cache) - common), 0)
        return common, -seq.last_used

    def _bring_back(self, seq: Sequence, tokens: list[int]) -> None:
        """Give `seq` the best start for `tokens` there is: a copy of a cache in host memory that
        shares more of them, or else its own, copied out first if it is to lose a sixteenth of it
        or more (another conversation after a shared system prompt, not the end of a turn)."""
        assert self.host is not None
        common = common_prefix(seq.cache, tokens)
        entry = self.host.find(tokens, better_than=common)
        if entry is not None:
            self.evict(seq)
            if self.host.restore(entry, seq.id):
                seq.cache, seq.entries = list(entry.tokens), entry.entries
        elif 16 * (len(seq.cache) - common) >= len(seq.cache) > 0:
            self.host.save(seq.id, seq.cache, seq.entries)

    def _reusable(self, seq: Sequence, tokens: list[int]) -> int:
        """How many of `tokens` `seq`'s cache can keep; at least the last one is decoded again,
        for its logits. A sliding-window cache may have dropped what an earlier position needs."""
        keep = min(common_prefix(seq.cache, tokens), len(tokens) - 1)
        if keep and self.n_swa:
            pos_min = llama_cpp.llama_memory_seq_pos_min(self.memory, seq.id)
            if pos_min > max(0, keep - self.n_swa):
                keep = 0
        return keep


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
