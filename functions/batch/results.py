"""A batch's results: one line of its output or error file, and its totals taken from them.

A line's result is stored in Redis as the line it becomes in the output file (or, `ok` false,
the error file), so a batch that ends writes them out as they are.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import orjson

from functions.batch.endpoints import usage_of
from shared.storage.objects import Batch, BatchCounts


def result_line(entry: dict[str, Any], status: int, body: dict[str, Any], ok: bool) -> str:
    """One line of the output or error file, as OpenAI writes them (`ok` says which file)."""
    return orjson.dumps({
        "id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": entry["custom_id"],
        "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
        "error": None, "ok": ok}).decode()


def totals(batch: Batch, results: Iterable[dict[str, Any]]) -> tuple[BatchCounts, dict[str, Any]]:
    """The request counts and token usage of the lines that ran, from their results."""
    completed = failed = prompt = output = cached = 0
    for r in results:
        if not r["ok"]:
            failed += 1
            continue
        completed += 1
        p, o, c = usage_of(r["response"]["body"])
        prompt, output, cached = prompt + p, output + o, cached + c
    counts = batch.request_counts.model_copy(update={"completed": completed, "failed": failed})
    return counts, {**batch.usage, "input_tokens": prompt, "output_tokens": output,
                    "total_tokens": prompt + output,
                    "input_tokens_details": {"cached_tokens": cached}}
