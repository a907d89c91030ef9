"""One choice being generated: what its tokens send, and when it is finished.

A choice owns everything that decides its output: its sampler chain, the UTF-8 and stop-string
hold-back (`TextStream`), the tool-call reader (`ToolStream`), the logprobs of tokens whose text
has not gone out yet, and its finish reason. The scheduler samples a token from the choice's
chain; `Choice.accept` takes it from there and turns it into this step's deltas of its task.
Everything here runs on the scheduler thread, once per sampled token, so it allocates no more
than the deltas it sends.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import llama_cpp
from llama_cpp._internals import LlamaContext, LlamaModel

from shared.jobs import Delta, Logprobs, ToolCallDelta
from workers.chat.tool_parse import ToolStream
from workers.engine import sampling
from workers.engine.textstream import TextStream

if TYPE_CHECKING:
    from workers.engine.task import Task


@dataclass(slots=True)
class TokenLogprob:
    """One sampled token's logprobs, kept until its text starts to go out."""

    text: str  # what the token completed: a character split over tokens belongs to the last
    logprob: float
    top: dict[str, float]  # the most likely tokens' texts and logprobs
    offset: int  # where its text starts in the choice's text


class Vocab:
    """What a choice asks of the model for each token: whether it ends generation, its bytes
    (remembered once looked up) and its logprobs. One per context, on its thread alone."""

    def __init__(self, model: LlamaModel, ctx: LlamaContext) -> None:
        self.vocab = model.vocab
        self.ctx = ctx.ctx
        self.n_vocab = model.n_vocab()
        self.pieces: dict[tuple[int, bool], bytes] = {}
        self._buf = ctypes.create_string_buffer(64)

    def is_eog(self, token: int) -> bool:
        return llama_cpp.llama_vocab_is_eog(self.vocab, token)

    def piece(self, token: int, special: bool) -> bytes:
        """The token's text as bytes (special tokens as nothing unless `special`)."""
        piece = self.pieces.get((token, special))
        if piece is None:
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._buf, len(self._buf), 0,
                                               special)
            if n < 0:  # longer than the buffer
                self._buf = ctypes.create_string_buffer(-n)
                return self.piece(token, special)
            piece = self.pieces[token, special] = self._buf.raw[:n]
        return piece

    def logprob(self, row: int, token: int, top_n: int, text: str, offset: int) -> TokenLogprob:
        """`token`'s entry under batch row `row`'s raw logits, with the `top_n` most likely."""
        lp, top = sampling.logprobs(self.ctx, row, self.n_vocab, token, top_n)
        # A part of a character shows its bytes (\xf0\x9f), so two parts do not collapse into
        # one "\ufffd" key.
        return TokenLogprob(text, lp, {self.piece(t, False).decode(errors="backslashreplace"): v
                                       for t, v in top}, offset)


@dataclass(eq=False)
class Choice:
    """One answer being generated: its sampler chain, its text and tool calls so far, and the
    logprobs waiting for their text to go out."""

    index: int
    chain: sampling.Sampler
    text: TextStream
    top_n: int | None  # logprobs alternatives asked for; None: no logprobs
    tools: ToolStream | None = None  # reads tool calls out of the text; None: plain text
    pending: list[TokenLogprob] = field(default_factory=list)  # logprobs not sent yet

    def accept(self, token: int, row: int, vocab: Vocab, task: Task, length: bool) -> bool:
        """Take the token sampled for this choice from batch row `row`, adding what it releases
        to `task`'s deltas; returns whether the choice ended: an end-of-generation token, a stop
        string, a whole tool call, or `length` (its sequence may have no more tokens)."""
        if vocab.is_eog(token):
            self.finish("stop", "", task)
            return True
        task.usage.completion_tokens += 1
        offset = self.text.decoded
        # Tool formats may start with a special token (Mistral's [TOOL_CALLS]): keep its text.
        text = self.text.feed(vocab.piece(token, special=self.tools is not None))
        if self.top_n is not None:
            # The token's text is what it completed: a character split over tokens belongs to
            # the last of them, so the tokens still add up to the content.
            self.pending.append(vocab.logprob(row, token, self.top_n, self.text.last, offset))
        if self.text.stopped or (self.tools is not None and self.tools.done):
            self.finish("stop", text, task)
        elif length:
            self.finish("length", text, task)
        else:
            if text:
                self._emit(text, None, task)
            return False
        return True

    def finish(self, reason: str, text: str, task: Task) -> None:
        """End with `reason`: `text` and whatever is still held go out, the last delta carrying
        the finish reason."""
        if not self.text.stopped:
            text += self.text.flush()
            if self.text.tail and self.pending:  # a cut character: the last token's text
                self.pending[-1].text += self.text.tail
        self._emit(text, reason, task)

    def _emit(self, text: str, finish: str | None, task: Task) -> None:
        """This step's deltas: the text released (less what tool calls take, which go out as
        pieces of their own), with the logprobs of the tokens whose text has started to go out
        (the rest wait for theirs; at the end, none waits)."""
        calls: list[ToolCallDelta] = []
        if self.tools is not None:
            text, calls = self.tools.feed(text, final=finish is not None)
            if finish == "stop" and self.tools.called and not self.tools.names_tool:
                finish = "tool_calls"
        sent = self.text.sent
        entries = [e for e in self.pending if e.offset < sent]
        self.pending = [] if finish else [e for e in self.pending if e.offset >= sent]
        lp = Logprobs(
            tokens=[e.text for e in entries], token_logprobs=[e.logprob for e in entries],
            top_logprobs=[e.top for e in entries], text_offset=[e.offset for e in entries],
        ) if entries else None
        deltas = [Delta(index=self.index, text=text, logprobs=lp)] \
            if text or lp or (finish and not calls) else []
        deltas += [Delta(index=self.index, tool_call=call) for call in calls]
        if deltas:
            deltas[-1].finish_reason = finish  # type: ignore[assignment]
            if finish == "stop" and self.text.stopped:
                deltas[-1].stop_sequence = self.text.matched
        task.deltas.extend(deltas)
