"""Continuous batching: one thread owns one `llama_context` and steps many sequences at once.

This is llama.cpp server's `update_slots` loop on llama-cpp-python's low-level API. The context
has `n_seq_max` sequences sharing one KV cache (`kv_unified`). Each step builds one batch: the
next token of every generating sequence first, then prompt tokens of admitted sequences, up to
`n_batch` in all, so a long prompt delays the streams already generating by one chunk at most.
Logits are asked for only where a token is sampled, and each sequence samples with its own
llama.cpp sampler chain; its `Choice` then decides what goes out and whether it is done. Tasks
join between steps and leave when they finish or are cancelled.

Interactive tasks go first. Batch lines (background tasks) may fill every sequence while none
is in; while one is, at most `interactive` (`FERRY_PARALLEL`) sequences work, so a step is as
short as with interactive jobs alone, and an interactive task pauses batch lines to start.
A step takes only as many of batch lines' prompt tokens as the engine decodes in `STEP_S`, so an
interactive request never comes during a step as long as many lines' prompts together.

A finished sequence keeps its KV cache, and `PrefixCache` gives a new prompt the free sequence
sharing the longest prefix with it, so only the rest is decoded; idle sequences' caches move to
host memory while others run. With `n > 1` the prompt is decoded once, on one sequence, and
copied to its siblings.

The context is not thread-safe: everything below `_loop` runs on the scheduler thread alone.
Messages leave through `post(sink, messages, done)`, which must not block (the publisher's queue).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import llama_cpp
from llama_cpp._internals import LlamaContext, LlamaModel

from shared.jobs import Delta, Final, Usage
from workers.engine import sampling
from workers.engine.choice import Vocab
from workers.engine.prefix_cache import PrefixCache
from workers.engine.sequence import Sequence, State
from workers.engine.task import Group, Outcome, Post, Task

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1  # how long the idle loop blocks for new work before looking again
# After an interactive task, batch lines stay within `interactive` sequences this long more:
# interactive requests come in bursts (a chat's turns, an agent's calls, many users), and each
# would otherwise wait for a full-width step of batch lines to end before it starts.
INTERACTIVE_HOLD_S = 2.0
# A step carries at most STEP_S's worth of batch lines' prompt tokens (at the engine's recent
# time per token), at least LINE_PROMPT_TOKENS or as many as it has sequences generating. Lines
# of one length end together, and the next ones' prompts would all go into one step: an
# interactive request that comes then waits for a step as long as all of them (on the CPU with a
# 1B model, 4 streams' TTFT p95 beside a batch was 6.4x idle). On the CPU a prompt token costs the
# same in chunks of 64 as of 512; a GPU decodes 512 in well under STEP_S, so nothing changes there.
# While interactive jobs are in (held), lines' prompts get only what is left of STEP_S after the
# step's other tokens, at least HELD_PROMPT_TOKENS: a 64-token floor made every step of 4 users
# beside a batch of the 1B model ~1.1 s.
STEP_S = 0.25
LINE_PROMPT_TOKENS = 64
HELD_PROMPT_TOKENS = 8


class Scheduler:
    def __init__(self, model: LlamaModel, ctx: LlamaContext, n_ctx: int, post: Post,
                 host_bytes: int = 0, interactive: int | None = None) -> None:
        """`host_bytes`: host memory for idle sequences' caches; 0: they stay in the context.
        `interactive`: the most sequences at work while an interactive task is in, and
        `INTERACTIVE_HOLD_S` after (unset: all); batch lines alone may fill every sequence."""
        self.model = model
        self.ctx = ctx
        self.n_batch = llama_cpp.llama_n_batch(ctx.ctx)  # as asked for, or the context if smaller
        self.post = post
        # llama.cpp may round the context up (64 -> 256); what was asked for is the limit.
        self.n_ctx = min(n_ctx, llama_cpp.llama_n_ctx_seq(ctx.ctx))
        self.n_vocab = model.n_vocab()
        self.vocab = Vocab(model, ctx)
        self.prefix = PrefixCache(model, ctx, host_bytes)
        self.memory, self.host = self.prefix.memory, self.prefix.host
        self.seqs = [Sequence(i) for i in range(llama_cpp.llama_n_seq_max(ctx.ctx))]
        self.interactive = min(interactive or len(self.seqs), len(self.seqs))
        self.held_until = 0.0  # monotonic: batch lines keep within `interactive` until then
        self.token_s = 0.0  # recent decode time per token in a step (0: none measured yet)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.tasks: list[Task] = []
        self.inbox: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    def cache_entries(self) -> set[str]:
        """What the sequences and host memory hold, as cache map entries (any thread)."""
        return self.prefix.cache_entries(self.seqs)

    def submit(self, task: Task) -> None:
        self.inbox.put(task)

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join()
        llama_cpp.llama_batch_free(self.batch)

    # Everything below runs on the scheduler thread.

    def _loop(self) -> None:
        while True:
            try:
                if not self.tasks:
                    self.prefix.copy_idle(self.seqs)
                if not self._take_new(block=not self.tasks):
                    return
                self._drop_cancelled()
                self._admit()
                if any(s.active for s in self.seqs):
                    self._step()
                self._flush()
            except Exception:
                log.exception("scheduler step failed; failing jobs %s",
                              ", ".join(t.job_id for t in self.tasks) or "(none)")
                self._fail_all()

    def _take_new(self, block: bool) -> bool:
        """Move new tasks in; False when asked to stop."""
        try:
            item = self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait()
            while True:
                if item is None:
                    for task in self.tasks:
                        task.output.cancelled = True
                    self._drop_cancelled()
                    self._flush()
                    return False
                self.tasks.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return True

    def _drop_cancelled(self) -> None:
        for seq in self.seqs:
            if seq.active and seq.task is not None and seq.task.cancelled:
                seq.leave()
        for task in self.tasks:
            if task.cancelled:
                task.waiting.clear()

    def _admit(self) -> None:
        """Start waiting groups; then move the caches of the sequences left idle to host memory,
        before the new prompts take cells."""
        if self._start_waiting():
            self.prefix.evict_idle(self.seqs)

    def _start_waiting(self) -> bool:
        """Give waiting groups free sequences, interactive tasks first, then batch lines, oldest
        first within each; whether any started. Batch lines alone may fill every sequence; while
        an interactive task is in, and `INTERACTIVE_HOLD_S` after, at most `interactive`
        sequences work (each decode step stays as short as with interactive jobs alone), and an
        interactive group that finds too little room pauses batch lines for it. A group that
        must wait holds back every task after it, so a batch line never takes the sequence an
        interactive job waits for."""
        started = False
        now = time.monotonic()
        if any(not t.background for t in self.tasks):
            self.held_until = now + INTERACTIVE_HOLD_S
        limit = self.interactive if now < self.held_until else len(self.seqs)
        for task in sorted(self.tasks, key=lambda t: t.background):  # stable: oldest first
            while task.waiting:
                free = [s for s in self.seqs if s.state is State.IDLE]
                busy = len(self.seqs) - len(free)
                room = min(len(free), limit - busy)
                group = task.waiting[0]
                if room < len(group.choices) and not task.background:
                    paused = self._pause_batch_lines(len(group.choices) - room)
                    free, room = free + paused, room + len(paused)
                if room < len(group.choices) or not self._fits(task, group, busy):
                    return started
                task.waiting.pop(0)
                self._start(task, group, free)
                started = True
        return started

    def _fits(self, task: Task, group: Group, busy: int) -> bool:
        """Whether `group` may start beside the `busy` sequences. Beyond `interactive` sequences
        a batch line starts only if the KV cache could hold it whole beside what the working
        sequences may yet fill, each to its `max_tokens` (or the context): more sequences must
        not end a line short for want of cells (`_end_largest`)."""
        if not task.background or busy + len(group.choices) <= self.interactive:
            return True
        held = sum(self._most(s.group) for s in self.seqs if s.active and s.group is not None)
        return held + len(group.choices) * self._most(group) <= self.n_ctx

    def _most(self, group: Group) -> int:
        """The most cells a choice of `group` may come to hold: its prompt and `max_tokens`."""
        return len(group.tokens) + (self.n_ctx if group.max_tokens is None else group.max_tokens)

    def _pause_batch_lines(self, wanted: int) -> list[Sequence]:
        """Free up to `wanted` sequences that generate for batch lines, those with the fewest
        tokens first. A paused line keeps its choice (sampler, text, stops) and waits, ahead of
        the lines not started, to go on from its last token: its cells stay in the sequence, or
        go to host memory, and `PrefixCache.place` finds them again, so it decodes that token
        alone when it resumes."""
        lines = sorted((s for s in self.seqs if s.state is State.GENERATING and s.task is not None
                        and s.task.background and s.group is not None
                        and len(s.group.choices) == 1), key=lambda s: s.generated)[:wanted]
        for seq in lines:
            assert seq.task is not None and seq.group is not None and seq.choice is not None
            limit = seq.group.max_tokens
            seq.task.waiting.insert(0, Group([*seq.cache, seq.next], [seq.choice],
                                             None if limit is None else limit - seq.generated,
                                             resumed=True))
            log.info("job %s paused for an interactive job after %d tokens", seq.task.job_id,
                     seq.generated)
            seq.leave()
        return lines

    def _start(self, task: Task, group: Group, free: list[Sequence]) -> None:
        """The group's prompt goes to the free sequence that holds most of it; the siblings its
        other choices take, the least recently used, copy its cells once it is decoded."""
        first, keep = self.prefix.place(group.tokens, free)
        first.todo = group.tokens[keep:]
        others = sorted((s for s in free if s is not first), key=lambda s: s.last_used)
        first.siblings = others[:len(group.choices) - 1]
        for seq, choice in zip([first, *first.siblings], group.choices, strict=True):
            if seq is not first:
                self.prefix.evict(seq)
            seq.start(task, group, choice)
        if not group.resumed:
            task.usage.prompt_tokens += len(group.tokens)
            task.usage.cached_tokens += keep

    def _step(self) -> None:
        """Decode one batch, then sample every sequence that has logits in it; release those
        whose choice ended (in this step, or for want of room in the KV cache)."""
        rows = self._decode()
        for seq, tokens in rows:
            seq.cache.extend(tokens)
            if seq.state is State.PROMPT:
                del seq.todo[:len(tokens)]
        for seq, _ in rows:
            if seq.row < 0:  # a prompt chunk with more to come
                continue
            for sibling in seq.siblings:
                self.prefix.copy(seq, sibling)
                sibling.row = seq.row
                self._sample(sibling)
            seq.siblings = []
            self._sample(seq)
        for seq in self.seqs:
            if seq.state is State.DONE:
                seq.release()

    def _decode(self) -> list[tuple[Sequence, list[int]]]:
        """Build the batch and decode it; what it held, sequence by sequence (none: nothing
        was left to decode)."""
        while True:
            rows = self._fill_batch()
            if not rows:
                return rows
            start = time.perf_counter()
            ret = llama_cpp.llama_decode(self.ctx.ctx, self.batch)
            if ret == 0:
                took = (time.perf_counter() - start) / self.batch.n_tokens
                self.token_s += (took - self.token_s) / 8 if self.token_s else took
                return rows
            if ret != 1:
                raise RuntimeError(f"llama_decode returned {ret}")
            # No room in the KV cache: drop idle sequences' caches, else end the largest.
            if not self.prefix.clear_idle(self.seqs):
                self._end_largest()

    def _fill_batch(self) -> list[tuple[Sequence, list[int]]]:
        """Put generating sequences' next tokens, then prompt chunks (interactive ones first),
        into the batch; batch lines' prompts within `lines_room`."""
        b = self.batch
        b.n_tokens = 0
        rows: list[tuple[Sequence, list[int]]] = []

        def add(seq: Sequence, tokens: list[int], logits_last: bool) -> None:
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

        def prompt(seq: Sequence, room: int) -> int:
            """Put up to `room` of `seq`'s prompt in; how many went."""
            if seq.state is not State.PROMPT or not seq.todo or room <= 0:
                return 0
            chunk = seq.todo[:room]
            add(seq, chunk, len(chunk) == len(seq.todo))
            return len(chunk)

        for seq in self.seqs:
            seq.row = -1
            if seq.state is State.GENERATING and b.n_tokens < self.n_batch:
                add(seq, [seq.next], True)

        lines = [s for s in self.seqs if s.task is not None and s.task.background]
        for seq in self.seqs:
            if seq not in lines:
                prompt(seq, self.n_batch - b.n_tokens)
        lines_room = self.lines_room(b.n_tokens)
        for seq in lines:
            lines_room -= prompt(seq, min(self.n_batch - b.n_tokens, lines_room))
        return rows

    def lines_room(self, others: int) -> int:
        """How many of batch lines' prompt tokens a step holding `others` tokens (generating
        sequences, interactive prompts) may carry besides (`STEP_S`)."""
        if not self.token_s:
            return self.n_batch
        budget = int(STEP_S / self.token_s)
        if time.monotonic() < self.held_until:
            return max(HELD_PROMPT_TOKENS, budget - others)
        return max(LINE_PROMPT_TOKENS, others, budget)

    def _end_largest(self) -> None:
        """The KV cache is full with nothing idle to drop: end the sequence holding the most,
        with `length`, and its siblings waiting on its prompt with it."""
        seq = max((s for s in self.seqs if s.active), key=lambda s: len(s.cache) + len(s.todo))
        assert seq.task is not None
        log.warning("KV cache full: ending sequence %d of job %s (%d tokens)", seq.id,
                    seq.task.job_id, len(seq.cache))
        for sibling in seq.siblings:
            sibling.end("length")
        seq.end("length")
        self.prefix.drop(seq)

    def _sample(self, seq: Sequence) -> None:
        assert seq.choice is not None
        token = sampling.sample(seq.choice.chain, self.ctx.ctx, seq.row, self.n_vocab)
        seq.sampled(token, self.vocab, self.n_ctx)

    def _flush(self) -> None:
        """Hand each task's messages of this step to the publisher; retire finished tasks, with
        their outcome."""
        still: list[Task] = []
        for task in self.tasks:
            done = task.finished
            messages: list[Delta | Final] = list(task.deltas)
            task.deltas = []
            if not task.started and messages and isinstance(messages[0], Delta):
                # What the prompt came to, known now: for APIs that say it before the answer.
                messages[0].usage = Usage(prompt_tokens=task.usage.prompt_tokens,
                                          cached_tokens=task.usage.cached_tokens)
                task.started = True
            if done:
                task.outcome = Outcome.CANCELLED if task.cancelled else Outcome.COMPLETED
                if task.outcome is Outcome.COMPLETED:
                    messages.append(Final(usage=task.usage))
            if messages or done:
                self.post(task.output, messages, done)
            if not done:
                still.append(task)
        self.tasks = still

    def _fail_all(self) -> None:
        """A step failed: every task in the context fails, and the context starts empty."""
        for seq in self.seqs:
            if seq.active:
                seq.leave()
            elif seq.state is State.DONE:
                seq.release()
        self.prefix.clear(self.seqs)
        for task in self.tasks:
            task.outcome = Outcome.FAILED
            task.waiting.clear()
            task.deltas = []
            self.post(task.output, [], True)
        self.tasks = []
