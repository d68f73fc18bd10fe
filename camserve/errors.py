"""The one exception family a person sees: each message says what was wrong and what to do."""


class CamserveError(Exception):
    """An error caused by the caller's input; the CLI prints it as one line and exits 2."""


class NotFoundError(CamserveError):
    """A named thing (a model) does not exist; gRPC NOT_FOUND."""


class LimitError(CamserveError):
    """A request over a configured limit; gRPC RESOURCE_EXHAUSTED."""


class DeadlineError(CamserveError):
    """The caller's deadline passed or it cancelled; gRPC DEADLINE_EXCEEDED."""
