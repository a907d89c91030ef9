"""Continuous batching: one thread owns one `llama_context` and steps many sequences at once.

This is llama.cpp server's `update_slots` loop on llama-cpp-python's low-level API. The context
has `n_seq_max` sequences sharing one KV cache (`kv_unified`). Each step builds one batch: the
next token of every generating sequence first, then prompt tokens of admitted sequences, up to
`n_batch` in all, so a long prompt delays the streams already generating by one chunk at most.
Logits are asked for only where a token is sampled, and each sequence samples with its own
llama.cpp sampler chain. Jobs join between steps and leave when they finish or are cancelled.

A finished sequence keeps its KV cache: a new prompt goes to the free sequence sharing the longest
prefix with it and decodes only the rest. When a job starts, the other idle sequences' caches
move to host memory (`HostCache`), where they cost the generating sequences nothing, and come back
for a prompt that starts like them. With `n > 1` the prompt is decoded once, on one sequence, and
copied to its siblings.

The context is not thread-safe: everything below `_loop` runs on the scheduler thread alone.
Messages leave through `post(run, messages, done)`, which must not block (the publisher's queue).
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import llama_cpp
from llama_cpp._internals import LlamaContext, LlamaModel

from shared.jobs import Delta, Final, Logprobs, ToolCallDelta, Usage
from workers.chat.tool_parse import ToolStream
from workers.engine import sampling
from workers.engine.prefix_cache import HostCache, common_prefix
from workers.engine.textstream import TextStream

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1  # how long the idle loop blocks for new work before looking again


@dataclass
class Choice:
    """One answer being generated: its sampler chain and its text so far."""

    index: int
    chain: sampling.Sampler
    text: TextStream
    top_n: int | None  # logprobs alternatives asked for; None: no logprobs
    tools: ToolStream | None = None  # reads tool calls out of the text; None: plain text
    pending: list[tuple[str, float, dict[str, float], int]] = field(default_factory=list)


@dataclass
class Group:
    """One prompt, decoded once, and the choices that continue it (at most `n_seq_max`)."""

    tokens: list[int]
    choices: list[Choice]
    max_tokens: int | None


class Sink(Protocol):
    """Where a run's messages go (`workers.publish.Answer`); any thread may set `cancelled`."""

    cancelled: bool


class Run:
    """A job inside the scheduler: its groups, and how far they have got."""

    def __init__(self, answer: Sink, groups: list[Group]) -> None:
        self.answer = answer
        self.waiting = list(groups)
        self.busy = 0  # sequences working for this run
        self.usage = Usage()
        self.failed = False  # llama.cpp failed under it
        self.deltas: list[Delta] = []  # this step's messages

    @property
    def cancelled(self) -> bool:
        """Leave at the next step: the client left, the job timed out, or the worker stops."""
        return self.answer.cancelled

    @property
    def finished(self) -> bool:
        return not self.waiting and not self.busy


class Seq:
    """One of the context's sequences; `cache` is what its KV cells hold, position by position."""

    def __init__(self, seq_id: int) -> None:
        self.id = seq_id
        self.cache: list[int] = []
        self.last_used = 0.0
        self.run: Run | None = None
        self.group: Group | None = None
        self.choice: Choice | None = None
        self.todo: list[int] = []  # prompt tokens still to decode (the group's first sequence)
        self.siblings: list[Seq] = []  # wait for this one's prompt, then copy its cache
        self.next: int | None = None  # sampled, to be decoded in the next step
        self.copied = False  # host memory holds a copy of `cache` (made while nothing ran)
        self.generated = 0
        self.row = -1  # batch row holding this sequence's logits after a decode

    def release(self) -> None:
        self.run = self.group = self.choice = None
        self.todo, self.siblings, self.next, self.generated = [], [], None, 0
        self.last_used = time.monotonic()


Post = Callable[[Any, Sequence[Delta | Final], bool], None]


class Scheduler:
    def __init__(self, model: LlamaModel, ctx: LlamaContext, n_ctx: int, post: Post,
                 host_bytes: int = 0) -> None:
        """`host_bytes`: host memory for idle sequences' caches; 0: they stay in the context."""
        self.model = model
        self.ctx = ctx
        self.n_batch = llama_cpp.llama_n_batch(ctx.ctx)  # as asked for, or the context if smaller
        self.post = post
        # llama.cpp may round the context up (64 -> 256); what was asked for is the limit.
        self.n_ctx = min(n_ctx, llama_cpp.llama_n_ctx_seq(ctx.ctx))
        self.n_vocab = model.n_vocab()
        self.n_swa = llama_cpp.llama_model_n_swa(model.model)
        self.memory = llama_cpp.llama_get_memory(ctx.ctx)
        self.seqs = [Seq(i) for i in range(llama_cpp.llama_n_seq_max(ctx.ctx))]
        self.host = HostCache(ctx.ctx, host_bytes) if host_bytes else None
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.runs: list[Run] = []
        self.pieces: dict[tuple[int, bool], bytes] = {}
        self._buf = ctypes.create_string_buffer(64)
        self.inbox: queue.SimpleQueue[Run | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    def submit(self, run: Run) -> None:
        self.inbox.put(run)

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join()
        llama_cpp.llama_batch_free(self.batch)

    # Everything below runs on the scheduler thread.

    def _loop(self) -> None:
        while True:
            try:
                if not self.runs:
                    self._copy_idle()
                if not self._take_new(block=not self.runs):
                    return
                self._drop_cancelled()
                self._admit()
                if any(s.run for s in self.seqs):
                    self._step()
                self._flush()
            except Exception:
                log.exception("scheduler step failed; failing the jobs in it")
                self._fail_all()

    def _take_new(self, block: bool) -> bool:
        """Move new runs in; False when asked to stop."""
        try:
            item = self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait()
            while True:
                if item is None:
                    for run in self.runs:
                        run.answer.cancelled = True
                    self._drop_cancelled()
                    self._flush()
                    return False
                self.runs.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return True

    def _drop_cancelled(self) -> None:
        for seq in self.seqs:
            if seq.run is not None and seq.run.cancelled:
                seq.run.busy -= 1
                seq.release()
        for run in self.runs:
            if run.cancelled:
                run.waiting.clear()

    def _admit(self) -> None:
        """Start waiting groups; then move the caches of the sequences left idle to host memory,
        before the new prompts take cells."""
        if self._start_waiting() and self.host is not None:
            for seq in self.seqs:
                if seq.run is None and seq.cache:
                    self._evict(seq)

    def _copy_idle(self) -> None:
        """With nothing to run, copy the idle caches to host memory now, so that the next job's
        start only drops them: a copy into fresh memory costs 2.4 ms for 150 tokens of SmolLM2
        here, on the decode thread, before the new prompt."""
        if self.host is None:
            return
        for seq in self.seqs:
            if seq.run is None and seq.cache and not seq.copied:
                self.host.save(seq.id, seq.cache)
                seq.copied = True

    def _start_waiting(self) -> bool:
        """Give waiting groups free sequences, oldest job first; whether any started."""
        started = False
        for run in self.runs:
            while run.waiting:
                free = [s for s in self.seqs if s.run is None]
                group = run.waiting[0]
                if len(free) < len(group.choices):
                    return started
                run.waiting.pop(0)
                self._start(run, group, free)
                started = True
        return started

    def _start(self, run: Run, group: Group, free: list[Seq]) -> None:
        first = max(free, key=lambda s: self._worth(s, group.tokens))
        if self.host is not None:
            self._bring_back(first, group.tokens)
        keep = self._reusable(first, group.tokens)
        if not llama_cpp.llama_memory_seq_rm(self.memory, first.id, keep, -1):
            llama_cpp.llama_memory_seq_rm(self.memory, first.id, -1, -1)
            keep = 0
        del first.cache[keep:]
        first.todo = group.tokens[keep:]
        others = sorted((s for s in free if s is not first), key=lambda s: s.last_used)
        first.siblings = others[:len(group.choices) - 1]
        for seq, choice in zip([first, *first.siblings], group.choices, strict=True):
            if seq is not first:
                self._evict(seq)
            seq.run, seq.group, seq.choice = run, group, choice
            seq.copied = False  # its cache changes from here
            run.busy += 1
        run.usage.prompt_tokens += len(group.tokens)
        run.usage.cached_tokens += keep

    def _worth(self, seq: Seq, tokens: list[int]) -> tuple[int, float]:
        """How good `seq` is for `tokens`: the cached tokens it reuses (among equals, the least
        recently used). Without host memory what it throws away is lost, so that counts twice
        against it: a shared system prompt does not take a live conversation's cache."""
        common = common_prefix(seq.cache, tokens)
        if self.host is None:
            common = max(common - 2 * (len(seq.cache) - common), 0)
        return common, -seq.last_used

    def _bring_back(self, seq: Seq, tokens: list[int]) -> None:
        """Give `seq` the best start for `tokens` there is: a copy of a cache in host memory that
        shares more of them, or else its own, copied out first if it is to lose a sixteenth of it
        or more (another conversation after a shared system prompt, not the end of a turn)."""
        assert self.host is not None
        common = common_prefix(seq.cache, tokens)
        entry = self.host.find(tokens, better_than=common)
        if entry is not None:
            self._evict(seq)
            if self.host.restore(entry, seq.id):
                seq.cache = list(entry.tokens)
        elif 16 * (len(seq.cache) - common) >= len(seq.cache) > 0:
            self.host.save(seq.id, seq.cache)

    def _reusable(self, seq: Seq, tokens: list[int]) -> int:
        """How many of `tokens` `seq`'s cache can keep; at least the last one is decoded again,
        for its logits. A sliding-window cache may have dropped what an earlier position needs."""
        keep = min(common_prefix(seq.cache, tokens), len(tokens) - 1)
        if keep and self.n_swa:
            pos_min = llama_cpp.llama_memory_seq_pos_min(self.memory, seq.id)
            if pos_min > max(0, keep - self.n_swa):
                keep = 0
        return keep

    def _step(self) -> None:
        """Decode one batch, then sample every sequence that has logits in it."""
        while True:
            rows = self._fill_batch()
            if not rows:
                return
            ret = llama_cpp.llama_decode(self.ctx.ctx, self.batch)
            if ret == 0:
                break
            if ret != 1:
                raise RuntimeError(f"llama_decode returned {ret}")
            # No room in the KV cache: drop idle sequences' caches, else end the largest.
            if not self._clear_idle():
                self._end_largest()
        for seq, tokens in rows:
            seq.cache.extend(tokens)
            if seq.todo:
                del seq.todo[:len(tokens)]
        for seq, _ in rows:
            if seq.row >= 0 and seq.siblings:
                for sibling in seq.siblings:
                    llama_cpp.llama_memory_seq_cp(self.memory, seq.id, sibling.id, -1, -1)
                    sibling.cache = list(seq.cache)
                    sibling.row = seq.row
                    self._sample(sibling)
                seq.siblings = []
            if seq.row >= 0:
                self._sample(seq)

    def _fill_batch(self) -> list[tuple[Seq, list[int]]]:
        """Put generating sequences' next tokens, then prompt chunks, into the batch."""
        b = self.batch
        b.n_tokens = 0
        rows: list[tuple[Seq, list[int]]] = []

        def add(seq: Seq, tokens: list[int], logits_last: bool) -> None:
            start = len(seq.cache)
            for j, token in enumerate(tokens):
                i = b.n_tokens
                b.token[i] = token
                b.pos[i] = start + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq.id
                b.logits[i] = logits_last and j == len(tokens) - 1
                b.n_tokens += 1
            seq.row = b.n_tokens - 1 if logits_last else -1
            rows.append((seq, tokens))

        for seq in self.seqs:
            seq.row = -1
            if seq.next is not None and b.n_tokens < self.n_batch:
                add(seq, [seq.next], True)
        for seq in self.seqs:
            room = self.n_batch - b.n_tokens
            if seq.todo and room > 0:
                add(seq, seq.todo[:room], len(seq.todo) <= room)
        return rows

    def _clear_idle(self) -> bool:
        idle = [s for s in self.seqs if s.run is None and s.cache]
        for seq in idle:
            self._evict(seq)
        return bool(idle)

    def _evict(self, seq: Seq) -> None:
        """Empty `seq`'s cells, keeping a copy in host memory if there is one."""
        if self.host is not None and seq.cache:
            self.host.save(seq.id, seq.cache)
        llama_cpp.llama_memory_seq_rm(self.memory, seq.id, -1, -1)
        seq.cache = []

    def _end_largest(self) -> None:
        busy = [s for s in self.seqs if s.run is not None]
        seq = max(busy, key=lambda s: len(s.cache) + len(s.todo))
        log.warning("KV cache full: ending sequence %d (%d tokens)", seq.id, len(seq.cache))
        for sibling in seq.siblings:  # waiting on this prompt: they end with it
            self._finish(sibling, "length", "")
        self._finish(seq, "length", "")
        llama_cpp.llama_memory_seq_rm(self.memory, seq.id, -1, -1)
        seq.cache = []

    def _sample(self, seq: Seq) -> None:
        assert seq.choice is not None and seq.group is not None and seq.run is not None
        choice, group = seq.choice, seq.group
        token = sampling.sample(choice.chain, self.ctx.ctx, seq.row, self.n_vocab)
        seq.generated += 1
        if llama_cpp.llama_vocab_is_eog(self.model.vocab, token):
            self._finish(seq, "stop", "")
            return
        seq.run.usage.completion_tokens += 1
        offset = choice.text.decoded
        # Tool formats may start with a special token (Mistral's [TOOL_CALLS]): keep its text.
        text = choice.text.feed(self._piece(token, special=choice.tools is not None))
        if choice.top_n is not None:
            # The token's text is what it completed: a character split over tokens belongs to
            # the last of them, so the tokens still add up to the content.
            lp, top = sampling.logprobs(self.ctx.ctx, seq.row, self.n_vocab, token, choice.top_n)
            choice.pending.append((
                choice.text.last, lp,
                # A part of a character shows its bytes (\xf0\x9f), so two parts do not
                # collapse into one "\ufffd" key.
                {self._piece(t, False).decode(errors="backslashreplace"): v for t, v in top},
                offset,
            ))
        if choice.text.stopped or (choice.tools is not None and choice.tools.done):
            self._finish(seq, "stop", text)
        elif group.max_tokens is not None and seq.generated >= group.max_tokens:
            self._finish(seq, "length", text)
        elif len(seq.cache) + 1 >= self.n_ctx:  # this token fills the context
            self._finish(seq, "length", text)
        else:
            seq.next = token
            if text:
                self._emit(seq, text, None)

    def _piece(self, token: int, special: bool) -> bytes:
        """The token's text as bytes (special tokens as nothing unless `special`), remembered
        once looked up."""
        piece = self.pieces.get((token, special))
        if piece is None:
            n = llama_cpp.llama_token_to_piece(self.model.vocab, token, self._buf, len(self._buf),
                                               0, special)
            if n < 0:  # longer than the buffer
                self._buf = ctypes.create_string_buffer(-n)
                return self._piece(token, special)
            piece = self.pieces[token, special] = self._buf.raw[:n]
        return piece

    def _emit(self, seq: Seq, text: str, finish: str | None) -> None:
        """This step's deltas: the text released (less what tool calls take, which go out as
        pieces of their own), with the logprobs of the tokens whose text has started to go out
        (the rest wait for theirs; at the end, none waits)."""
        assert seq.choice is not None and seq.run is not None
        choice = seq.choice
        calls: list[ToolCallDelta] = []
        if choice.tools is not None:
            text, calls = choice.tools.feed(text, final=finish is not None)
            if finish == "stop" and choice.tools.called and not choice.tools.names_tool:
                finish = "tool_calls"
        sent = choice.text.sent
        entries = [e for e in choice.pending if e[3] < sent]
        choice.pending = [] if finish else [e for e in choice.pending if e[3] >= sent]
        lp = Logprobs(
            tokens=[e[0] for e in entries], token_logprobs=[e[1] for e in entries],
            top_logprobs=[e[2] for e in entries], text_offset=[e[3] for e in entries],
        ) if entries else None
        deltas = [Delta(index=choice.index, text=text, logprobs=lp)] \
            if text or lp or (finish and not calls) else []
        deltas += [Delta(index=choice.index, tool_call=call) for call in calls]
        if deltas:
            deltas[-1].finish_reason = finish  # type: ignore[assignment]
        seq.run.deltas.extend(deltas)

    def _finish(self, seq: Seq, reason: str, text: str) -> None:
        assert seq.choice is not None and seq.run is not None
        choice = seq.choice
        if not choice.text.stopped:
            text += choice.text.flush()
            if choice.text.tail and choice.pending:  # a cut character: the last token's text
                token, lp, top, offset = choice.pending[-1]
                choice.pending[-1] = (token + choice.text.tail, lp, top, offset)
        self._emit(seq, text, reason)
        seq.run.busy -= 1
        seq.release()

    def _flush(self) -> None:
        """Hand each run's messages of this step to the publisher; retire finished runs."""
        still: list[Run] = []
        for run in self.runs:
            done = run.finished
            messages: list[Delta | Final] = list(run.deltas)
            run.deltas = []
            if done and not run.cancelled:
                messages.append(Final(usage=run.usage))
            if messages or done:
                self.post(run.answer, messages, done)
            if not done:
                still.append(run)
        self.runs = still

    def _fail_all(self) -> None:
        for run in self.runs:
            run.failed = run.answer.cancelled = True
        self._drop_cancelled()
        llama_cpp.llama_memory_clear(self.memory, True)
        for seq in self.seqs:
            seq.cache = []
        for run in self.runs:
            run.deltas = []
            self.post(run.answer, [], True)
        self.runs = []
