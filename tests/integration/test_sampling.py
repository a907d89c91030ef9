"""Plain greedy picks what llama.cpp's greedy chain picks, on the real model's logits."""

from __future__ import annotations

from collections.abc import Iterator

import llama_cpp
import pytest
from llama_cpp._internals import LlamaContext, LlamaModel, LlamaSampler

from shared.jobs import Sampling
from tests.helpers import smollm_path
from workers.engine import sampling

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3,"]


@pytest.fixture(scope="module")
def rows() -> Iterator[tuple[LlamaModel, LlamaContext, list[int]]]:
    """Four prompts decoded as four sequences of one batch; the batch row of each one's logits."""
    llama_cpp.llama_backend_init()
    model = LlamaModel(path_model=str(smollm_path()),
                       params=llama_cpp.llama_model_default_params(), verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.kv_unified = 256, len(PROMPTS), True
    ctx = LlamaContext(model=model, params=params, verbose=False)
    batch = llama_cpp.llama_batch_init(256, 0, 1)
    found = []
    for seq, prompt in enumerate(PROMPTS):
        tokens = model.tokenize(prompt.encode(), add_bos=True, special=True)
        for pos, token in enumerate(tokens):
            i = batch.n_tokens
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, pos == len(tokens) - 1
            batch.n_tokens += 1
        found.append(batch.n_tokens - 1)
    assert llama_cpp.llama_decode(ctx.ctx, batch) == 0
    yield model, ctx, found
    llama_cpp.llama_batch_free(batch)
    ctx.close()
    model.close()


def greedy_chain(n_vocab: int, bias: dict[int, float]) -> LlamaSampler:
    chain = LlamaSampler()
    if bias:
        chain.add_logit_bias(n_vocab, bias)
    chain.add_greedy()
    return chain


def test_greedy_matches_the_chain_with_and_without_bias(
        rows: tuple[LlamaModel, LlamaContext, list[int]]) -> None:
    model, ctx, found = rows
    n_vocab = model.n_vocab()
    for row in found:
        best = sampling.Greedy({}).sample(ctx.ctx, row, n_vocab)
        second = sampling.Greedy({best: float("-inf")}).sample(ctx.ctx, row, n_vocab)
        assert second != best
        # A tie (two tokens pushed to the same huge logit) goes to the lower id, in both.
        for bias in ({}, {best: float("-inf")}, {best: -2.5, second: 1.5}, {7: 1e30, 5: 1e30}):
            chain = greedy_chain(n_vocab, bias)
            expected = llama_cpp.llama_sampler_sample(chain.sampler, ctx.ctx, row)
            assert sampling.Greedy(bias).sample(ctx.ctx, row, n_vocab) == expected
        assert sampling.Greedy({7: 1e30, 5: 1e30}).sample(ctx.ctx, row, n_vocab) == 5
        # The raw logits are left as they were (logprobs read them after sampling).
        assert sampling.Greedy({}).sample(ctx.ctx, row, n_vocab) == best


def test_only_plain_greedy_skips_the_chain(rows: tuple[LlamaModel, LlamaContext, list[int]]
                                           ) -> None:
    model = rows[0]
    pick = sampling.chain
    assert isinstance(pick(model, Sampling(temperature=0), {}, None, None, []), sampling.Greedy)
    for s in (Sampling(temperature=0.7), Sampling(temperature=0, repeat_penalty=1.1),
              Sampling(temperature=0, presence_penalty=0.5)):
        assert isinstance(pick(model, s, {}, None, None, [1, 2]), LlamaSampler)
    grammar = sampling.schema_grammar({})
    assert isinstance(pick(model, Sampling(temperature=0), {}, grammar, None, []), LlamaSampler)
