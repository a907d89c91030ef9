"""`/extras/tokenize`, `/extras/tokenize/count`, `/extras/detokenize` with the model's own tokenizer.

The web process loads only the model's vocabulary (llama.cpp's ``vocab_only``: no weights, a few
milliseconds), once per model, so tokenizing never waits behind a generation on a worker.
"""

from __future__ import annotations

import asyncio
from typing import Any

from quart import Blueprint

from functions.context import state
from functions.http.body import parse_body
from functions.http.openapi import operation
from functions.openai import answers as a
from functions.openai.protocol import DetokenizeRequest, TokenizeRequest
from shared.errors import InvalidRequest
from shared.registry import models

bp = Blueprint("tokenize", __name__)


async def tokenizer(model: str | None) -> Any:
    st = state()
    record = await models.get(st.redis, model or st.settings.default_model)
    if record.id not in st.tokenizers:
        from llama_cpp import Llama

        st.tokenizers[record.id] = await asyncio.to_thread(
            Llama, model_path=record.path, vocab_only=True, verbose=False
        )
    return st.tokenizers[record.id]


@bp.post("/extras/tokenize")
@operation("Tokenize text with a model's tokenizer", body=TokenizeRequest, response=a.Tokens)
async def tokenize() -> Any:
    req = await parse_body(TokenizeRequest)
    vocab = await tokenizer(req.model)
    tokens = vocab.tokenize(req.input.encode(), add_bos=req.add_special, special=True)
    if req.with_pieces:
        pieces = [vocab.detokenize([t], special=True).decode(errors="replace") for t in tokens]
        return {"tokens": [{"id": t, "piece": p} for t, p in zip(tokens, pieces, strict=True)]}
    return {"tokens": tokens}


@bp.post("/extras/tokenize/count")
@operation("Count tokens", body=TokenizeRequest, response=a.TokenCount)
async def count() -> Any:
    req = await parse_body(TokenizeRequest)
    vocab = await tokenizer(req.model)
    return {"count": len(vocab.tokenize(req.input.encode(), add_bos=req.add_special, special=True))}


@bp.post("/extras/detokenize")
@operation("Turn tokens back into text", body=DetokenizeRequest, response=a.Detokenized)
async def detokenize() -> Any:
    req = await parse_body(DetokenizeRequest)
    vocab = await tokenizer(req.model)
    bad = [t for t in req.tokens if not 0 <= t < vocab.n_vocab()]
    if bad:
        raise InvalidRequest(f"token ids out of range: {bad[:5]}", param="tokens")
    return {"content": vocab.detokenize(req.tokens, special=True).decode(errors="replace")}
