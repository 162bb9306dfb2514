"""Errors that name what went wrong with one request."""


class StageError(RuntimeError):
    """A stage that cannot complete for this request; the message says why."""
