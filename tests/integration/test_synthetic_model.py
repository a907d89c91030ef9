"""bench/synthetic_model.py: the GGUF it writes is one llama.cpp loads, with the bundled model's
vocabulary and chat template, the shape asked for, and a forward pass that gives finite logits."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np

from bench import synthetic_model
from shared.registry import gguf_info
from shared.registry.models import resolve


def test_a_synthetic_model_loads_and_generates(tmp_path: Path) -> None:
    out = tmp_path / "tiny.gguf"
    params = synthetic_model.write(out, "tiny", "q8_0")
    hidden, layers, ffn, heads, kv_heads = synthetic_model.SHAPES["tiny"]
    vocab = 49152
    assert params == 2 * vocab * hidden + layers * (
        hidden * hidden * 2 + 2 * hidden * (hidden // heads * kv_heads) + 3 * hidden * ffn)

    bundled_path = resolve("smollm2-135m-instruct", Path("/nonexistent")).path
    info, bundled = gguf_info.read(out), gguf_info.read(Path(bundled_path))
    assert info["architecture"] == "llama"
    assert info["parameters"] == params + (2 * layers + 1) * hidden  # and the norms
    assert info["chat_template"] == bundled["chat_template"]

    llm = llama_cpp.Llama(str(out), n_ctx=256, n_threads=2, verbose=False, logits_all=True)
    small = llama_cpp.Llama(bundled_path, n_ctx=256, n_threads=2, verbose=False, vocab_only=True)
    text = b"The sea is wide, and the ships are small."
    tokens = llm.tokenize(text)
    assert tokens == small.tokenize(text)
    assert llm.detokenize(tokens).strip() == text
    llm.eval(tokens)
    assert llm.n_tokens == len(tokens)
    assert np.isfinite(llm.scores[:len(tokens)]).all()
    out_chat = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=4)
    assert out_chat["usage"]["completion_tokens"] <= 4
    assert out_chat["usage"]["prompt_tokens"] > 1
