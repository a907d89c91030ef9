"""The one error codec: what a worker (or a control command) sends is what the handler raises."""

from __future__ import annotations

import pytest

from shared import errors
from shared.errors import FerryError, WireError
from shared.jobs import Error, decode, encode


def _sample(cls: type[FerryError]) -> FerryError:
    if cls is errors.RateLimited:
        return cls("slow down", retry_after_s=3)
    return cls(f"a {cls.__name__}", param="messages[0].content", code=cls.default_code)


ALL = errors._classes(FerryError)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_error_keeps_status_type_param_and_code_across_the_wire(cls: type[FerryError]) -> None:
    sent = _sample(cls)
    wire = Error.of(sent)
    back = decode(encode(wire))
    assert isinstance(back, Error)
    got = back.exception()
    assert (got.status, got.type, got.message, got.param, got.code) == \
        (sent.status, sent.type, sent.message, sent.param, sent.code)
    assert got.to_dict() == sent.to_dict()
    if cls is not errors.RateLimited:  # rebuilt only where it is raised: on the web side
        assert type(got) is cls


def test_a_cancelled_job_is_499_not_500() -> None:
    got = WireError(status=499, message="The request was cancelled by the client",
                    code="cancelled").exception()
    assert isinstance(got, errors.Cancelled)
    assert got.status == 499 and got.type == "cancelled"


def test_an_unknown_code_falls_back_to_its_status_and_keeps_what_was_sent() -> None:
    got = WireError(status=409, message="busy", type="custom_type", code="brand_new",
                    param="model").exception()
    assert isinstance(got, errors.Conflict)
    assert (got.status, got.type, got.code, got.param) == (409, "custom_type", "brand_new", "model")
    odd = WireError(status=418, message="teapot").exception()
    assert type(odd) is FerryError and odd.status == 418 and odd.type == "server_error"


def test_messages_written_before_the_type_field_still_decode() -> None:
    old = b'{"kind": "error", "status": 503, "message": "gone", "code": "worker_lost"}'
    got = decode(old)
    assert isinstance(got, Error)
    error = got.exception()
    assert isinstance(error, errors.WorkerLost) and error.type == "service_unavailable"
