"""Schemas become grammars: ones that only annotate a value accept any value."""

from __future__ import annotations

import pytest

from shared.errors import InvalidRequest
from workers.engine.sampling import _any_for_annotations, schema_grammar


def test_annotation_only_subschemas_accept_anything() -> None:
    """Claude Code's Workflow tool has `"args": {"description": ...}`; llama.cpp's converter
    refused it, so every request with that tool failed."""
    schema = {"type": "object", "properties": {
        "args": {"description": "any JSON value"},
        "list": {"type": "array", "items": {"title": "anything"}},
        "name": {"type": "string", "description": "kept", "maxLength": 524288}},
        "required": ["name"]}
    assert _any_for_annotations(schema)["properties"] == {
        "args": {}, "list": {"type": "array"}, "name": {"type": "string", "description": "kept"}}
    assert len(schema_grammar(schema, "tools").gbnf) < 10_000  # not 4 MB, which crashed llama.cpp
    with pytest.raises(InvalidRequest):
        schema_grammar({"type": "object", "properties": {"x": {"type": "no-such-type"}}})


def test_a_string_holds_no_raw_control_character() -> None:
    """llama-cpp-python's converter let a JSON string take a raw newline, which no JSON parser
    reads (bench/soak.py's json_schema answers failed `orjson.loads` twice in 536). Checked on
    SmolLM2's real vocabulary, inside llama.cpp."""

    import llama_cpp
    from llama_cpp._internals import LlamaModel

    from tests.helpers import allowed_tokens, smollm_path
    from workers.engine import sampling

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = LlamaModel(path_model=str(smollm_path()), params=params, verbose=False)
    try:
        schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                   "note": {"type": "string"}},
                  "required": ["name", "note"], "additionalProperties": False}
        sampler = sampling._grammar_sampler(model, schema_grammar(schema))
        n_vocab = model.n_vocab()


        def token(text: str) -> int:
            [t] = model.tokenize(text.encode(), add_bos=False, special=False)
            return t

        for text in ('{"name": "Ann', '", "note": "Hi'):
            for t in model.tokenize(text.encode(), add_bos=False, special=False):
                llama_cpp.llama_sampler_accept(sampler, t)
            ok = allowed_tokens(sampler, n_vocab)
            assert token("\n") not in ok and token("\t") not in ok
            assert token("a") in ok and token(" and") in ok
    finally:
        model.close()
