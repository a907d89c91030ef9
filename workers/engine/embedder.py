"""An embedding model's engine: a llama.cpp context with embeddings on and the model's pooling,
and one thread that packs every waiting input, whichever job it came from, into the next decode.

As in llama-server, each input is a sequence of its own and its pooled vector is read with
`llama_get_embeddings_seq`, then L2-normalised. A decode holds whole inputs only (a non-causal
model must see all of a sequence at once): as many as `n_batch` tokens and `n_seq_max` sequences
allow, oldest job first, so the inputs of concurrent requests share one `llama_decode`. Nothing is
kept between decodes.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaContext, LlamaModel

from shared.errors import ContextLengthExceeded, FerryError, InvalidRequest, WorkerStopping
from shared.jobs import EmbeddingJob
from shared.registry.models import ModelRecord
from shared.settings import Settings
from workers.engine.engine import load_model, new_context, physical_cores

log = logging.getLogger(__name__)

SEQUENCES = 64  # inputs one decode may hold (llama.cpp allows 256); an encoder keeps no KV per sequence


@dataclass
class _Request:
    """One job's inputs as tokens, and their vectors as the decodes fill them."""

    tokens: list[list[int]]
    done: asyncio.Future[list[str]]
    loop: asyncio.AbstractEventLoop
    vectors: list[str] = field(default_factory=list)

    @property
    def next(self) -> list[int] | None:
        return self.tokens[len(self.vectors)] if len(self.vectors) < len(self.tokens) else None


class Embedder:
    """One embedding model, loaded once; `embed` returns a job's vectors."""

    def __init__(self, model: LlamaModel, ctx: LlamaContext, record: ModelRecord,
                 settings: Settings) -> None:
        self.model = model
        self.ctx = ctx
        self.record = record
        self.n_embd = llama_cpp.llama_model_n_embd(model.model)
        self.n_vocab = model.n_vocab()
        self.n_batch = llama_cpp.llama_n_batch(ctx.ctx)
        self.n_seq = llama_cpp.llama_n_seq_max(ctx.ctx)
        self.capacity = self.n_seq  # jobs worth taking at once: each brings one input at least
        self.batch_capacity = self.n_seq  # batch lines too
        # Longest input: the model's trained context, or less if Ferry's context is smaller.
        self.n_ctx = min(settings.ctx_len, model.n_ctx_train(), self.n_batch)
        self.memory = llama_cpp.llama_get_memory(ctx.ctx)  # None for an encoder such as BERT
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.packed: deque[int] = deque()  # jobs in each decode since `take_packed` last ran
        self.inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="embedder", daemon=True)
        self.thread.start()

    @classmethod
    def load(cls, record: ModelRecord, settings: Settings, gpu: bool, one_gpu: bool) -> Embedder:
        if record.metadata.get("pooling_type") == llama_cpp.LLAMA_POOLING_TYPE_RANK:
            raise InvalidRequest(f"'{record.id}' is a reranker, not an embedding model", param="model")
        model = load_model(record, settings, gpu, one_gpu)
        n_batch = max(settings.n_batch, min(settings.ctx_len, model.n_ctx_train()))
        cparams = llama_cpp.llama_context_default_params()
        cparams.embeddings = True
        cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED  # the GGUF's own
        cparams.n_ctx = n_batch  # a decode's tokens, all sequences together
        cparams.n_batch = cparams.n_ubatch = n_batch  # a non-causal model takes a decode whole
        cparams.n_seq_max = SEQUENCES
        cparams.kv_unified = True
        cparams.n_threads = cparams.n_threads_batch = settings.n_threads or physical_cores()
        return cls(model, new_context(model, cparams), record, settings)

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join()
        llama_cpp.llama_batch_free(self.batch)
        self.ctx.close()
        self.model.close()

    def tokenize(self, job: EmbeddingJob) -> list[list[int]]:
        """Each input's tokens (a text gets the model's special tokens, as llama-server adds
        them; token ids are taken as they are); refuses an empty or too long input."""
        out = []
        for i, item in enumerate(job.inputs):
            param = "input" if len(job.inputs) == 1 else f"input[{i}]"
            if isinstance(item, str):
                tokens = self.model.tokenize(item.encode(), add_bos=True, special=True) if item else []
            else:
                tokens = item
                if bad := [t for t in tokens if not 0 <= t < self.n_vocab]:
                    raise InvalidRequest(f"Token ids out of the model's vocabulary "
                                         f"(0-{self.n_vocab - 1}): {bad[:5]}", param=param,
                                         code="invalid_value")
            if not tokens:
                raise InvalidRequest("An input cannot be empty", param=param, code="invalid_value")
            if len(tokens) > self.n_ctx:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {self.n_ctx} tokens, however you "
                    f"requested {len(tokens)} tokens in {param}. Please reduce your input.",
                    param=param)
            out.append(tokens)
        return out

    async def embed(self, job: EmbeddingJob) -> tuple[list[str], int]:
        """The job's vectors (base64 float32, in input order) and its prompt tokens. Identical
        inputs are embedded once, so they get the same vector bit for bit (a row's place in a
        decode can change the last bits of its sums), and they still count in the usage."""
        tokens = await asyncio.to_thread(self.tokenize, job)
        unique = list(dict.fromkeys(map(tuple, tokens)))
        loop = asyncio.get_running_loop()
        request = _Request([list(t) for t in unique], loop.create_future(), loop)
        self.inbox.put(request)
        vectors = dict(zip(unique, await request.done, strict=True))
        return [vectors[tuple(t)] for t in tokens], sum(map(len, tokens))

    def take_packed(self) -> list[int]:
        """How many jobs each decode since the last call held (for /metrics)."""
        return [self.packed.popleft() for _ in range(len(self.packed))]  # the thread appends meanwhile

    # Everything below runs on the embedder thread.

    def _loop(self) -> None:
        waiting: list[_Request] = []
        while True:
            try:
                item = self.inbox.get() if not waiting else self.inbox.get_nowait()
                while True:
                    if item is None:
                        for request in waiting:
                            _resolve(request, WorkerStopping(
                                "The worker is shutting down; retry the request"))
                        return
                    waiting.append(item)
                    item = self.inbox.get_nowait()
            except queue.Empty:
                pass
            try:
                self._decode(waiting)
            except Exception as e:
                log.exception("embedding decode failed")
                for request in waiting:
                    _resolve(request, FerryError(f"Embedding failed on the worker: {e}"))
                waiting.clear()
            for request in [r for r in waiting if r.next is None]:
                waiting.remove(request)
                _resolve(request, None)

    def _decode(self, waiting: list[_Request]) -> None:
        """One decode of as many waiting inputs as fit, oldest job first; their vectors read."""
        b = self.batch
        b.n_tokens = 0
        rows: list[tuple[_Request, int]] = []  # each sequence's job, and which of its inputs
        for request in waiting:
            while (tokens := request.next) is not None and len(rows) < self.n_seq \
                    and b.n_tokens + len(tokens) <= self.n_batch:
                seq = len(rows)
                for pos, token in enumerate(tokens):
                    i = b.n_tokens
                    b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, True
                    b.seq_id[i][0] = seq
                    b.n_tokens += 1
                rows.append((request, len(request.vectors)))
                request.vectors.append("")  # taken; its vector is filled in below
            if request.next is not None:  # no room for its next input: later jobs wait too
                break
        if not rows:
            return
        ret = llama_cpp.llama_decode(self.ctx.ctx, b)
        if ret != 0:
            raise RuntimeError(f"llama_decode returned {ret}")
        for seq, (request, index) in enumerate(rows):
            pointer = llama_cpp.llama_get_embeddings_seq(self.ctx.ctx, seq)
            if not pointer:
                raise RuntimeError(f"no pooled embedding for sequence {seq}")
            vector = np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).astype("<f4")
            norm = float(np.linalg.norm(vector))
            if norm > 0:
                vector /= norm
            request.vectors[index] = base64.b64encode(vector.tobytes()).decode()
        if self.memory:
            llama_cpp.llama_memory_clear(self.memory, True)
        self.packed.append(len({id(r) for r, _ in rows}))


def _resolve(request: _Request, error: BaseException | None) -> None:
    def settle() -> None:
        if request.done.done():
            return
        if error is None:
            request.done.set_result(request.vectors)
        else:
            request.done.set_exception(error)

    request.loop.call_soon_threadsafe(settle)
