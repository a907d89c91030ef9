"""Ferry's errors, each carrying its OpenAI error type and HTTP status.

    FerryError                      500 server_error
    ├── InvalidRequest              400 invalid_request_error
    │   └── ContextLengthExceeded   400 invalid_request_error / context_length_exceeded
    ├── Unauthorized                401 invalid_request_error / invalid_api_key
    ├── Forbidden                   403 permission_error
    ├── NotFound                    404 invalid_request_error
    ├── MethodNotAllowed            405 invalid_request_error
    ├── Conflict                    409 invalid_request_error
    ├── PayloadTooLarge             413 invalid_request_error
    ├── QueueFull                   429 rate_limit_error (Retry-After)
    ├── RateLimited                 429 rate_limit_error (Retry-After)
    ├── Cancelled                   499 cancelled: the client, or a cancel request, stopped it
    ├── InsufficientMemory          507 insufficient_storage
    └── Unavailable                 503 service_unavailable (Retry-After)
        ├── NoWorker                no live worker serves the model
        ├── WorkerLost              the worker running the job stopped beating
        └── WorkerStopping          the worker was draining and its deadline passed

Library errors are translated into these where they enter Ferry; one handler in
`functions.app` renders them as ``{"error": {"message", "type", "param", "code"}}``. An error
that crosses Redis (a worker's job, a control command) travels as a `WireError`, the one codec:
status, type, message, param and code go both ways unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel
from typing_extensions import Self


class FerryError(Exception):
    # Per class; an error rebuilt from the wire keeps the status and type it was sent with.
    status: int = 500
    type: str = "server_error"
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


class WorkerStopping(Unavailable):
    default_code = "worker_stopping"


class Cancelled(FerryError):
    """A job stopped because its client left or asked it to (nginx's 499, client closed)."""

    status = 499
    type = "cancelled"
    default_code = "cancelled"


def _classes(root: type[FerryError]) -> list[type[FerryError]]:
    return [root, *(c for sub in root.__subclasses__() for c in _classes(sub))]


# Rebuilt by code first, then by status. Classes with a constructor of their own (RateLimited,
# raised only by the web side) are not rebuilt.
_REBUILT = [c for c in _classes(FerryError) if c.__init__ is FerryError.__init__]
_BY_CODE = {c.default_code: c for c in _REBUILT if c.default_code}
_BY_STATUS: dict[int, type[FerryError]] = {
    400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 405: MethodNotAllowed,
    409: Conflict, 413: PayloadTooLarge, 429: QueueFull, 499: Cancelled, 503: Unavailable,
    507: InsufficientMemory,
}


class WireError(BaseModel):
    """A `FerryError` as it crosses Redis (a job's last stream message, a control answer)."""

    status: int
    message: str
    type: str | None = None  # None: the type of the class its code or status names
    code: str | None = None
    param: str | None = None

    @classmethod
    def of(cls, error: FerryError) -> Self:
        return cls(status=error.status, message=error.message, type=error.type, code=error.code,
                   param=error.param)

    def exception(self) -> FerryError:
        """The error again, of the class its code (else its status) names, with the same status,
        type, message, param and code."""
        kind = _BY_CODE.get(self.code or "") or _BY_STATUS.get(self.status, FerryError)
        error = kind(self.message, param=self.param, code=self.code)
        error.status = self.status
        error.type = self.type or error.type
        return error
