"""Ferry's errors, each carrying its OpenAI error type and HTTP status.

    FerryError                      500 server_error
    ├── InvalidRequest              400 invalid_request_error
    │   └── ContextLengthExceeded   400 invalid_request_error / context_length_exceeded
    ├── NotFound                    404 invalid_request_error
    ├── MethodNotAllowed            405 invalid_request_error
    ├── Conflict                    409 invalid_request_error
    ├── PayloadTooLarge             413 invalid_request_error
    ├── QueueFull                   429 rate_limit_error (Retry-After)
    └── Unavailable                 503 service_unavailable (Retry-After)
        ├── NoWorker                no live worker serves the model
        └── WorkerLost              the worker running the job stopped beating

Library errors are translated into these where they enter Ferry; one handler in
`functions.app` renders them as ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class FerryError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None
    retry_after: ClassVar[int | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after else {}


class InvalidRequest(FerryError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class Unauthorized(FerryError):
    """No credentials, or ones that are malformed, expired, wrongly signed or revoked."""

    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": f'Bearer realm="ferry", error="invalid_token", '
                                    f'error_description="{self.message}"'}


class Forbidden(FerryError):
    status = 403
    type = "permission_error"
    default_code = "insufficient_permissions"


class NotFound(FerryError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowed(FerryError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class Conflict(FerryError):
    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(FerryError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class QueueFull(FerryError):
    status = 429
    type = "rate_limit_error"
    default_code = "queue_full"
    retry_after = 1


class InsufficientMemory(FerryError):
    """The model needs more memory than any worker has, even with every other model unloaded."""

    status = 507
    type = "insufficient_storage"
    default_code = "model_too_large"


class RateLimited(FerryError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Unavailable(FerryError):
    status = 503
    type = "service_unavailable"
    default_code = "service_unavailable"
    retry_after = 2


class NoWorker(Unavailable):
    default_code = "no_worker"


class WorkerLost(Unavailable):
    default_code = "worker_lost"


_BY_CODE: dict[str, type[FerryError]] = {
    "context_length_exceeded": ContextLengthExceeded,
    "worker_lost": WorkerLost,
    "no_worker": NoWorker,
}
_BY_STATUS: dict[int, type[FerryError]] = {
    400: InvalidRequest,
    404: NotFound,
    409: Conflict,
    429: QueueFull,
    503: Unavailable,
    507: InsufficientMemory,
}


def from_wire(status: int, message: str, code: str | None, param: str | None) -> FerryError:
    """Rebuild an error a worker published, so the handler raises the same kind."""
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status, FerryError)
    return cls(message, param=param, code=code)
