"""Every exception Scrutiny raises lives here.

The tree::

    ScrutinyError
    ├── ConfigurationError        bad arguments, bad settings, a feedback that cannot be wired
    ├── RecordingError            a recording used wrongly (no record yet, several records, ...)
    ├── FeedbackError             raised by a feedback or by its evaluation
    │   ├── FeedbackTimeout       an attempt took longer than the feedback's timeout
    │   ├── InvalidFeedbackValue  the function returned something that is not a score
    │   ├── TransientError        a call failed in a way worth retrying (429, 5xx, reset)
    │   └── SkipFeedback          raised *by a feedback function* to end as `skipped`
    └── StorageError              the database refused or failed a request

Errors that happen while evaluating never reach the application: they become `failed`
results with the reason. Errors are raised to the user only for misuse of the API.
"""

from __future__ import annotations

from typing import Any

from scrutiny.core._secrets import scrub

__all__ = [
    "ConfigurationError",
    "FeedbackError",
    "FeedbackTimeout",
    "InvalidFeedbackValue",
    "RecordingError",
    "ScrutinyError",
    "SkipFeedback",
    "StorageError",
    "TransientError",
]


class ScrutinyError(Exception):
    """Base class of every error raised by Scrutiny."""


class ConfigurationError(ScrutinyError, ValueError):
    """An argument or setting is invalid; the message says how to fix it."""


class RecordingError(ScrutinyError, RuntimeError):
    """A recording was used in a way that cannot give a record."""


class FeedbackError(ScrutinyError):
    """A feedback function could not produce a score."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled back from a cluster worker (Session(executor=...)) with what it carries:
        # the default rebuilt it by calling the class with its message alone, which lost
        # `retry_after` and failed outright for those with keyword-only arguments.
        return (_rebuilt, (type(self), self.args, self.__dict__))


def _rebuilt(cls: type[FeedbackError], args: tuple[Any, ...],
             state: dict[str, Any]) -> FeedbackError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class FeedbackTimeout(FeedbackError, TimeoutError):
    """One attempt of a feedback function ran longer than its timeout."""

    def __init__(self, message: str, *, timeout: float) -> None:
        super().__init__(message)
        self.timeout = timeout


class InvalidFeedbackValue(FeedbackError, TypeError):
    """A feedback function returned a value that is not a finite score."""

    def __init__(self, message: str, *, value: object) -> None:
        super().__init__(message)
        self.value = value


class TransientError(FeedbackError):
    """A call failed in a way worth trying again (rate limited, overloaded, reset).

    `retry_after` is the server's hint, honoured as the least wait before the next attempt.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SkipFeedback(FeedbackError):
    """Raise inside a feedback function to end its result as `skipped` with this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StorageError(ScrutinyError, RuntimeError):
    """The database could not store or read what was asked."""


def describe_error(exc: BaseException) -> str:
    """A one-line, readable reason: the exception's type and message, with the secrets a
    client's error quotes (an API key in a request URL, an Authorization header) masked:
    this is what is stored, logged and shown (see :mod:`scrutiny.core._secrets`). Never
    raises: an exception whose ``__str__`` fails is named with a note instead of its
    message."""
    name = type(exc).__name__
    try:
        text = scrub(str(exc).strip())
    except Exception:
        return f"{name} (its message could not be read: str() of it raised)"
    return f"{name}: {text}" if text else name
