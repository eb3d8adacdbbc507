"""The errors raised by providers; they extend the core tree (see ``scrutiny.core._errors``).

The tree::

    FeedbackError                    (scrutiny.core)
    └── TransientError               (scrutiny.core) a call worth retrying
        └── TransientJudgeError      a judge model's call failed in a way worth retrying
                                     (rate limited, timed out, overloaded, 5xx); carries the
                                     server's retry-after hint when it gave one

A missing optional dependency raises :class:`ModuleNotFoundError` whose message names the
extra to install (``pip install 'scrutiny[embeddings]'``).
"""

from __future__ import annotations

from scrutiny.core import TransientError

__all__ = ["TransientJudgeError", "missing_extra"]


class TransientJudgeError(TransientError):
    """A judge call failed transiently (HTTP 429/5xx, timeout, connection reset).

    The judge's default :class:`~scrutiny.RetryPolicy` retries exactly these (and
    per-attempt timeouts); `retry_after` is honoured as the least wait before the next try.
    """


def missing_extra(what: str, extra: str, packages: str) -> ModuleNotFoundError:
    """The error for an optional dependency that is not installed."""
    return ModuleNotFoundError(
        f"{what} needs {packages}, which is not installed: pip install 'scrutiny[{extra}]'")
