"""Sampling inside llama.cpp: one sampler chain per sequence, and logprobs from raw logits.

The chain follows llama.cpp's own order (common/sampling.cpp): logit bias, penalties, grammar,
then top-k, top-p, min-p, temperature and a seeded draw, or greedy at temperature 0.
`llama_sampler_sample` applies the chain to a batch row's logits and accepts the token it picks.
Plain greedy (temperature 0, no penalties, no grammar) needs no chain: `Greedy` takes the row's
largest logit.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import llama_grammar
from llama_cpp._internals import LlamaModel, LlamaSampler

from shared.errors import InvalidRequest
from shared.jobs import Sampling

PENALTY_LAST_N = 64  # tokens the penalties look back over, as llama-cpp-python did


@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar; with `patterns` or `tokens` it is lazy: idle until a pattern matches the
    text (from its first group, else the match) or a token is sampled."""

    gbnf: str
    patterns: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()
    param: str = "response_format"  # the request field it came from, for errors


class Greedy:
    """Temperature 0 with no penalties and no grammar: the largest logit (after the bias), read
    straight off the batch row. A chain would first copy the whole vocabulary into a candidates
    array: 60-90 us a token for SmolLM2's 49k here against ~14, on the decode thread, once per
    sequence per step. Ties go to the lowest token id, as in llama.cpp's greedy sampler."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.tokens = np.fromiter(bias, dtype=np.int64, count=len(bias))
        self.values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def sample(self, ctx: llama_cpp.llama_context_p, row: int, n_vocab: int) -> int:
        logits = _row(ctx, row, n_vocab)
        if len(self.tokens):
            logits = logits.copy()  # the raw logits stay as they are, for logprobs
            logits[self.tokens] += self.values
        return int(logits.argmax())


Sampler = LlamaSampler | Greedy


def sample(sampler: Sampler, ctx: llama_cpp.llama_context_p, row: int, n_vocab: int) -> int:
    """The next token from batch row `row`; a chain accepts it as it picks it."""
    if isinstance(sampler, Greedy):
        return sampler.sample(ctx, row, n_vocab)
    return llama_cpp.llama_sampler_sample(sampler.sampler, ctx, row)


def chain(model: LlamaModel, s: Sampling, bias: dict[int, float], grammar: Grammar | None,
          seed: int | None, prompt: list[int]) -> Sampler:
    """A sampler chain for one sequence (plain greedy: `Greedy`, no chain); the penalties have
    already seen the prompt's end."""
    penalised = s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty
    if s.temperature <= 0 and not penalised and grammar is None:
        return Greedy(bias)
    out = LlamaSampler()
    n_vocab = model.n_vocab()
    if bias:
        out.add_logit_bias(n_vocab, bias)
    if penalised:
        out.add_penalties(n_vocab, PENALTY_LAST_N, s.repeat_penalty, s.frequency_penalty,
                          s.presence_penalty)
        penalties = llama_cpp.llama_sampler_chain_get(
            out.sampler, llama_cpp.llama_sampler_chain_n(out.sampler) - 1)
        for token in prompt[-PENALTY_LAST_N:]:
            llama_cpp.llama_sampler_accept(penalties, token)
    if grammar is not None:
        llama_cpp.llama_sampler_chain_add(out.sampler, _grammar_sampler(model, grammar))
    if s.temperature <= 0:
        out.add_greedy()
        return out
    if s.top_k > 0:
        out.add_top_k(s.top_k)
    if s.top_p < 1.0:
        out.add_top_p(s.top_p, 1)
    if s.min_p > 0.0:
        out.add_min_p(s.min_p, 1)
    out.add_temp(s.temperature)
    out.add_dist(llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF)
    return out


def _grammar_sampler(model: LlamaModel, g: Grammar) -> llama_cpp.llama_sampler_p:
    if g.patterns or g.tokens:
        patterns = (ctypes.c_char_p * len(g.patterns))(*(p.encode() for p in g.patterns))
        tokens = (llama_cpp.llama_token * len(g.tokens))(*g.tokens)
        sampler = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
            model.vocab, g.gbnf.encode(), b"root", patterns, len(g.patterns), tokens,
            len(g.tokens))
    else:
        sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, g.gbnf.encode(), b"root")
    if not sampler:  # llama.cpp could not parse it
        raise InvalidRequest(f"The {g.param} schema cannot be enforced", param=g.param)
    return sampler


# Keywords that only annotate a schema: one with nothing else accepts any value (JSON Schema), but
# llama.cpp's converter refuses it ("Unrecognized schema"); Claude Code's tools have such fields.
ANNOTATIONS = {"description", "title", "default", "examples", "$comment", "deprecated",
               "readOnly", "writeOnly"}
# Bounds the converter writes out as that many repetitions: Claude Code's `maxLength: 524288` made
# a 4 MB grammar that crashed llama.cpp (SIGSEGV). Bounds above this are left unenforced.
LARGEST_BOUND = 256
BOUNDS = {"minLength", "maxLength", "minItems", "maxItems"}


def schema_grammar(schema: dict[str, Any], param: str = "response_format") -> Grammar:
    """A grammar forcing JSON that `schema` accepts; `{}` means any object (json_object mode)."""
    return _schema_grammar(json.dumps(schema if not schema else _any_for_annotations(schema)),
                           param)


def _any_for_annotations(node: Any) -> Any:
    """`node` with every subschema that only annotates written as `{}` (any value), and length
    bounds past `LARGEST_BOUND` dropped."""
    if isinstance(node, list):
        return [_any_for_annotations(n) for n in node]
    if not isinstance(node, dict):
        return node
    if node and set(node) <= ANNOTATIONS:
        return {}
    out = {}
    for key, value in node.items():
        if key in ("properties", "$defs", "definitions", "patternProperties"):
            out[key] = {k: _any_for_annotations(v) for k, v in value.items()} \
                if isinstance(value, dict) else value
        elif key in BOUNDS and isinstance(value, int) and value > LARGEST_BOUND:
            continue
        elif key in ANNOTATIONS or key in ("enum", "const", "required"):
            out[key] = value
        elif (sub := _any_for_annotations(value)) != {} or key != "items":
            out[key] = sub  # `items: {}` trips the converter; no `items` means the same
    return out


# llama-cpp-python's converter lets a string hold raw control characters (a newline, a tab),
# which no JSON parser accepts; llama.cpp's own converter (and JSON_GBNF) leave them out.
LOOSE_CHAR = r'char ::= [^"\\] |'
JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


@lru_cache(maxsize=64)
def _schema_grammar(schema_json: str, param: str) -> Grammar:
    try:
        if schema_json == "{}":
            return Grammar(llama_grammar.JSON_GBNF, param=param)
        gbnf = llama_grammar.json_schema_to_gbnf(schema_json).replace(LOOSE_CHAR, JSON_CHAR)
        return Grammar(gbnf, param=param)
    except Exception as e:  # llama-cpp-python raises bare ValueError/RuntimeError here
        raise InvalidRequest(f"The {param} schema cannot be enforced: {e}", param=param) from e


def logprobs(ctx: llama_cpp.llama_context_p, row: int, n_vocab: int, token: int, top_n: int
             ) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under batch row `row`'s raw logits, and the top `top_n`."""
    logits = _row(ctx, row, n_vocab)
    shifted = logits - logits.max()
    lse = float(np.log(np.exp(shifted).sum()))
    top: list[tuple[int, float]] = []
    if top_n:
        best = np.argpartition(shifted, -top_n)[-top_n:]
        best = best[np.argsort(shifted[best])[::-1]]
        top = [(int(t), float(shifted[t]) - lse) for t in best]
    return float(shifted[token]) - lse, top


def _row(ctx: llama_cpp.llama_context_p, row: int, n_vocab: int) -> np.ndarray:
    """Batch row `row`'s logits, in place (valid until the next decode)."""
    ptr = llama_cpp.llama_get_logits_ith(ctx, row)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                 shape=(n_vocab,))
