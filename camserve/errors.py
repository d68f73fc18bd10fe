"""The one exception family a person sees: each message says what was wrong and what to do.

    CamserveError                 caught by every CLI: one line, exit 2
    ├── CallerError               the caller's input (a request, an image, an option)
    │   ├── NotFoundError         a named thing (a model) does not exist
    │   ├── LimitError            over a configured limit
    │   └── DeadlineError         the caller's deadline passed or it cancelled
    ├── OperatorError             the setup: a model file, a device, a port, a flag
    │   └── ContractError         a model file does not follow graph contract v1
    └── RemoteError               a server (camserve or Triton) refused a call; ``code``

``status_name`` maps an exception to the gRPC status the server answers with, so that the
table lives here once; the server turns the name into ``grpc.StatusCode``, the core imports
no gRPC code.
"""

from __future__ import annotations


class CamserveError(Exception):
    """Anything camserve refuses with a message a person can act on."""


class CallerError(CamserveError):
    """An error caused by the caller's input; gRPC INVALID_ARGUMENT."""


class NotFoundError(CallerError):
    """A named thing (a model) does not exist; gRPC NOT_FOUND."""


class LimitError(CallerError):
    """A request over a configured limit; gRPC RESOURCE_EXHAUSTED."""


class DeadlineError(CallerError):
    """The caller's deadline passed or it cancelled; gRPC DEADLINE_EXCEEDED."""


class OperatorError(CamserveError):
    """An error in what the operator set up: a model file, a device, a port, a flag.
    In a call (a reload) it is gRPC FAILED_PRECONDITION."""


class ContractError(OperatorError):
    """A model file does not follow graph contract v1."""


class RemoteError(CamserveError):
    """A server refused or failed a call: ``code`` is the gRPC status name (e.g.
    "INVALID_ARGUMENT"), ``request_id`` the request's id when it had one."""

    def __init__(self, message: str, code: str = "UNKNOWN", request_id: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


_STATUS = ((NotFoundError, "NOT_FOUND"), (LimitError, "RESOURCE_EXHAUSTED"),
           (DeadlineError, "DEADLINE_EXCEEDED"), (CallerError, "INVALID_ARGUMENT"),
           (OperatorError, "FAILED_PRECONDITION"), (CamserveError, "INVALID_ARGUMENT"))


def status_name(exc: BaseException) -> str:
    """The gRPC status name a server answers ``exc`` with: INTERNAL for anything that is not
    a ``CamserveError`` (a bug: the server logs it and hides its text)."""
    if isinstance(exc, RemoteError):
        return exc.code
    for kind, name in _STATUS:
        if isinstance(exc, kind):
            return name
    return "INTERNAL"
