"""A feedback importable by workers from a module of its own (see test_scale)."""

from __future__ import annotations


def text_length(output: str) -> float:
    return min(1.0, len(str(output)) / 10)
