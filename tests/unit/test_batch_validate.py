"""The batch input checks (`functions.batch.validate`), line by line: no Redis, no model.

The input file reaches `read_lines` a chunk at a time, so every file here is also fed in pieces
cut mid-line (and mid-character), to show a line's checks do not depend on where chunks end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from functions.batch.validate import MAX_ERRORS, check_line, first_of_each_model, line_error, read_lines

CHAT = "/v1/chat/completions"
BODY = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}


def good(custom_id: str | None = "r1", **changes: Any) -> dict[str, Any]:
    """A good line of a chat batch, as a dict; a change of None drops that field."""
    item = {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": BODY, **changes}
    return {k: v for k, v in item.items() if v is not None}


def line(item: Any) -> bytes:
    return orjson.dumps(item)


def whole(data: bytes) -> Iterator[bytes]:
    yield data


def bytewise(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i:i + 1]


def sevens(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), 7):
        yield data[i:i + 7]


def at_newlines(data: bytes) -> Iterator[bytes]:
    """Cut just before and just after every line end, with empty chunks between."""
    start = 0
    for i, b in enumerate(data):
        if b == ord("\n"):
            yield data[start:i]
            yield b""
            yield data[i:i + 1]
            start = i + 1
    yield data[start:]


def uneven(data: bytes) -> Iterator[bytes]:
    sizes, i, k = (1, 13, 2, 64, 5, 3), 0, 0
    while i < len(data):
        yield data[i:i + sizes[k % len(sizes)]]
        i += sizes[k % len(sizes)]
        k += 1


SPLITS = [whole, bytewise, sevens, at_newlines, uneven]


@pytest.fixture(params=SPLITS, ids=lambda f: f.__name__)
def split(request: pytest.FixtureRequest) -> Callable[[bytes], Iterator[bytes]]:
    return request.param  # type: ignore[no-any-return]


def read(split: Callable[[bytes], Iterator[bytes]], rows: list[bytes], endpoint: str = CHAT,
         max_lines: int = 1000, end: bytes = b"\n"
         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return read_lines(split(end.join(rows) + end), endpoint, max_lines)


def only_error(split: Callable[[bytes], Iterator[bytes]], rows: list[bytes]) -> dict[str, Any]:
    _, errors = read(split, rows)
    assert len(errors) == 1, errors
    assert isinstance(errors[0]["message"], str) and errors[0]["message"]
    return errors[0]


# One error code at a time

@pytest.mark.parametrize("raw", [b'{"custom_id": "r1",', b"not json", b'{"custom_id": "r1"}}',
                                 b"\xff\xfe"])
def test_invalid_json_line(split: Any, raw: bytes) -> None:
    error = only_error(split, [raw])
    assert (error["code"], error["line"], error["param"]) == ("invalid_json_line", 1, None)


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"3", b"null", b"true"])
def test_a_line_that_is_not_an_object(split: Any, raw: bytes) -> None:
    error = only_error(split, [raw])
    assert (error["code"], error["line"], error["param"]) == ("invalid_request", 1, None)


@pytest.mark.parametrize("custom_id", ["", 5, None, ["r1"], {"id": "r1"}])
def test_a_custom_id_that_is_not_a_nonempty_string(split: Any, custom_id: Any) -> None:
    item = {**good(), "custom_id": custom_id}  # kept even when None: present, but null
    error = only_error(split, [line(item)])
    assert (error["code"], error["line"], error["param"]) == ("invalid_request", 1, "custom_id")


@pytest.mark.parametrize("body", ["hi", [BODY], 3, None])
def test_a_body_that_is_not_an_object(split: Any, body: Any) -> None:
    item = {**good(), "body": body}
    error = only_error(split, [line(item)])
    assert (error["code"], error["line"], error["param"]) == ("invalid_request", 1, "body")


@pytest.mark.parametrize("field", ["custom_id", "method", "url", "body"])
def test_a_missing_field(split: Any, field: str) -> None:
    error = only_error(split, [line(good(**{field: None}))])
    assert (error["code"], error["line"], error["param"]) == (
        "missing_required_parameter", 1, field)
    assert field in error["message"]


def test_the_first_missing_field_is_the_one_reported(split: Any) -> None:
    error = only_error(split, [line({"url": CHAT})])
    assert (error["code"], error["param"]) == ("missing_required_parameter", "custom_id")
    error = only_error(split, [line({"custom_id": "r1", "url": CHAT})])
    assert (error["code"], error["param"]) == ("missing_required_parameter", "method")


def test_a_duplicate_custom_id(split: Any) -> None:
    entries, errors = read(split, [line(good("same")), line(good("other")),
                                   line(good("same"))])
    assert [e["custom_id"] for e in entries] == ["same", "other"]
    assert [(e["code"], e["line"], e["param"]) for e in errors] == [
        ("duplicate_custom_id", 3, "custom_id")]
    assert "same" in errors[0]["message"]


def test_a_custom_id_counts_as_seen_even_when_a_later_check_fails(split: Any) -> None:
    entries, errors = read(split, [line(good("r1", method="GET")), line(good("r1"))])
    assert entries == []
    assert [(e["code"], e["line"]) for e in errors] == [("invalid_method", 1),
                                                         ("duplicate_custom_id", 2)]


@pytest.mark.parametrize("method", ["GET", "post", "PUT", 1])
def test_a_method_other_than_post(split: Any, method: Any) -> None:
    error = only_error(split, [line(good(method=method))])
    assert (error["code"], error["line"], error["param"]) == ("invalid_method", 1, "method")


@pytest.mark.parametrize("url", ["/v1/completions", "/v1/chat/completions/", "v1/chat/completions",
                                 "/v1/embeddings", 42])
def test_a_url_other_than_the_batch_endpoint(split: Any, url: Any) -> None:
    error = only_error(split, [line(good(url=url))])
    assert (error["code"], error["line"], error["param"]) == ("mismatched_endpoint", 1, "url")
    assert CHAT in error["message"]


def test_the_endpoint_is_the_batch_own(split: Any) -> None:
    item = good(url="/v1/completions", body={"model": "m", "prompt": "Hi"})
    entries, errors = read(split, [line(item)], endpoint="/v1/completions")
    assert errors == [] and [e["custom_id"] for e in entries] == ["r1"]
    _, errors = read(split, [line(good())], endpoint="/v1/completions")  # a chat line
    assert [(e["code"], e["param"]) for e in errors] == [("mismatched_endpoint", "url")]


def test_a_streaming_body(split: Any) -> None:
    error = only_error(split, [line(good(body={**BODY, "stream": True}))])
    assert (error["code"], error["line"], error["param"]) == ("stream_unsupported", 1, "body.stream")


@pytest.mark.parametrize("stream", [False, None, 0])
def test_a_body_that_does_not_stream_is_fine(split: Any, stream: Any) -> None:
    entries, errors = read(split, [line(good(body={**BODY, "stream": stream}))])
    assert errors == [] and len(entries) == 1


def test_too_many_lines(split: Any) -> None:
    rows = [line(good(f"r{i}")) for i in range(3)]
    entries, errors = read(split, rows, max_lines=2)
    assert [e["custom_id"] for e in entries] == ["r0", "r1"]
    assert [(e["code"], e["line"], e["param"]) for e in errors] == [("too_many_lines", 3, None)]
    assert "2" in errors[0]["message"]


def test_as_many_lines_as_allowed_is_fine(split: Any) -> None:
    rows = [line(good(f"r{i}")) for i in range(3)]
    entries, errors = read(split, [*rows, b"", b"  "], max_lines=3)  # blank lines are no requests
    assert errors == [] and len(entries) == 3


def test_too_many_lines_counts_requests_and_stops_reading(split: Any) -> None:
    rows = [b"", line(good("r0")), b"bad", b"", line(good("r1")), line(good("r2")),
            b"also bad", line(good("r3"))]
    entries, errors = read(split, rows, max_lines=2)
    assert [(e["custom_id"], e["line"]) for e in entries] == [("r0", 2), ("r1", 5)]
    # A bad line is no request: the third request (line 6) is one too many, and nothing after it
    # is read.
    assert [(e["code"], e["line"]) for e in errors] == [("invalid_json_line", 3),
                                                         ("too_many_lines", 6)]


# Whole files

def test_a_mixed_file(split: Any) -> None:
    rows = [
        line(good("a")),  # 1
        b"",  # 2
        b'{"custom_id": "broken"',  # 3
        b"   \t",  # 4: blank too
        line(good("b", body={"model": "other", "messages": []})),  # 5
        line(good("a")),  # 6
        b"",  # 7
        line(good("c", url="/v1/completions")),  # 8
        line(good("d", method="GET")),  # 9
        line(good("e", body={**BODY, "stream": True})),  # 10
        line(good("f", body="text")),  # 11
        line(good("g", url=None)),  # 12
        b"[]",  # 13
        line(good("")),  # 14
        line(good("h")),  # 15
    ]
    entries, errors = read(split, rows)
    assert entries == [
        {"custom_id": "a", "body": BODY, "line": 1},
        {"custom_id": "b", "body": {"model": "other", "messages": []}, "line": 5},
        {"custom_id": "h", "body": BODY, "line": 15},
    ]
    assert [(e["code"], e["line"], e["param"]) for e in errors] == [
        ("invalid_json_line", 3, None),
        ("duplicate_custom_id", 6, "custom_id"),
        ("mismatched_endpoint", 8, "url"),
        ("invalid_method", 9, "method"),
        ("stream_unsupported", 10, "body.stream"),
        ("invalid_request", 11, "body"),
        ("missing_required_parameter", 12, "url"),
        ("invalid_request", 13, None),
        ("invalid_request", 14, "custom_id"),
    ]
    assert all(set(e) == {"code", "line", "message", "param"} for e in errors)


@pytest.mark.parametrize("end", [b"\n", b"\r\n"])
def test_line_ends_and_no_last_newline(split: Any, end: bytes) -> None:
    rows = [line(good("a")), b"", line(good("b"))]
    data = end.join(rows)  # no line end after the last line
    entries, errors = read_lines(split(data), CHAT, 10)
    assert errors == [] and [(e["custom_id"], e["line"]) for e in entries] == [("a", 1), ("b", 3)]


def test_text_beyond_ascii_cut_mid_character(split: Any) -> None:
    item = good("café-übung-日本", body={**BODY, "messages": [{"role": "user", "content": "naïve ✓"}]})
    entries, errors = read(split, [line(item), line(good("café-übung-日本"))])
    assert entries == [{**{k: item[k] for k in ("custom_id", "body")}, "line": 1}]
    assert [(e["code"], e["line"]) for e in errors] == [("duplicate_custom_id", 2)]


@pytest.mark.parametrize("data", [b"", b"\n", b"\n\n  \n", b"\r\n"])
def test_an_empty_file(split: Any, data: bytes) -> None:
    assert read_lines(split(data), CHAT, 10) == ([], [])


# The error cap

def test_errors_stop_at_max_errors(split: Any) -> None:
    rows = [b"bad" if i % 2 else b"" for i in range(2 * MAX_ERRORS + 40)]  # bad lines 2, 4, ...
    rows.append(line(good("late")))
    entries, errors = read(split, rows)
    assert len(errors) == MAX_ERRORS
    assert [e["line"] for e in errors] == [2 * (i + 1) for i in range(MAX_ERRORS)]
    assert entries == []  # reading stopped at the cap: the last line was never reached


def test_fewer_errors_than_the_cap_read_on(split: Any) -> None:
    rows = [b"bad"] * (MAX_ERRORS - 1) + [line(good("ok"))]
    entries, errors = read(split, rows)
    assert len(errors) == MAX_ERRORS - 1
    assert [(e["custom_id"], e["line"]) for e in entries] == [("ok", MAX_ERRORS)]


# The helpers on their own

def test_check_line() -> None:
    seen: set[str] = set()
    assert check_line(line(good("a")), CHAT, seen) == ({"custom_id": "a", "body": BODY}, None)
    assert seen == {"a"}
    entry, error = check_line(line(good("a")), CHAT, seen)
    assert entry == {} and error is not None
    assert (error["code"], error["line"], error["param"]) == ("duplicate_custom_id", None, "custom_id")


def test_extra_fields_are_not_kept() -> None:
    entry, error = check_line(line({**good("a"), "extra": 1}), CHAT, set())
    assert error is None and entry == {"custom_id": "a", "body": BODY}


def test_first_of_each_model() -> None:
    entries, _ = read_lines(whole(b"\n".join([
        line(good("a", body={"model": "m1"})),
        line(good("b", body={})),
        b"",
        line(good("c", body={"model": "m1"})),
        line(good("d", body={"model": "m2"})),
        line(good("e", body={"model": None})),
    ])), CHAT, 10)
    assert first_of_each_model(entries) == [("m1", 1), (None, 2), ("m2", 5)]
    assert first_of_each_model([]) == []


def test_line_error() -> None:
    assert line_error("empty_file", None, "The input file has no requests") == {
        "code": "empty_file", "line": None, "message": "The input file has no requests",
        "param": None}
    assert line_error("model_not_found", 4, "No model 'x'", "body.model")["param"] == "body.model"
