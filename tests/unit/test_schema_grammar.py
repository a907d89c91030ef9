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
