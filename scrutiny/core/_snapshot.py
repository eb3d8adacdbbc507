"""Values as they are now: their dicts and lists copied, however deep (within bounds).

A record is stored later, on the session's writer thread, and its feedbacks judge it later
still. An application that changes a dict or list it handed over — a chain's state dict
changed in place from step to step, a dataset loop that fills one `metadata` dict per row —
changed what had been recorded, and what was judged: every record of the loop was stored
with the last row's values. Only dicts and lists are copied (other objects — messages,
documents, model responses — are made anew rather than changed by the frameworks), up to
SNAPSHOT_DEPTH levels and SNAPSHOT_ITEMS items; beyond that, values stay as they are.
"""

from __future__ import annotations

from typing import Any

__all__ = ["snapshot"]

SNAPSHOT_DEPTH = 8
SNAPSHOT_ITEMS = 2000
_MUTABLE = frozenset((dict, list))


def snapshot(value: Any) -> Any:
    """`value` with its dicts and lists copied (the value itself when it is neither)."""
    kind = type(value)
    if kind is not dict and kind is not list:
        return value
    return _copied(value, SNAPSHOT_DEPTH, [SNAPSHOT_ITEMS])


def _copied(value: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= len(value)
    if budget[0] < 0 or depth == 0:
        return value
    copied = value.copy()  # (C speed; only nested containers are visited again)
    items = copied.items() if type(copied) is dict else enumerate(copied)
    for key, item in items:
        if type(item) in _MUTABLE:
            copied[key] = _copied(item, depth - 1, budget)
    return copied
