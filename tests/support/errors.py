"""Exceptions apps really raise that are awkward to report."""

from __future__ import annotations


class Unprintable(Exception):
    """An exception whose message cannot be read: its ``__str__`` raises (a lazy message
    built from a resource that is gone, a bug in a library's exception class)."""

    def __str__(self) -> str:
        raise RuntimeError("the message of this exception cannot be built")


UNREADABLE = "Unprintable (its message could not be read: str() of it raised)"
"""How Scrutiny describes one."""
