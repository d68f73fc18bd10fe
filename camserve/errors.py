"""The one exception family a person sees: each message says what was wrong and what to do."""


class CamserveError(Exception):
    """An error caused by the caller's input; the CLI prints it as one line and exits 2."""
