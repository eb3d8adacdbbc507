"""Missing values as tables give them: pandas and numpy write a missing cell as NaN (or
``pd.NA``, ``pd.NaT``), not None.

A dataset read with ``pd.read_csv`` and built into records gave its empty cells as NaN:
selected for a feedback, a missing ground truth was the text "nan" (an exact match scored
it 0.0, and an answer missing as well matched it, 1.0), and a judge was sent "nan" as the
answer — while the stored record showed no value (JSON has no NaN), and a worker scoring
the stored row skipped it.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["is_missing"]

_PANDAS_MISSING = frozenset(("NAType", "NaTType"))


def is_missing(value: Any) -> bool:
    """Whether `value` stands for no value: None, a float NaN (numpy's too), pandas' NA or
    NaT."""
    if value is None:
        return True
    if isinstance(value, float):  # (numpy.float64 is one)
        return math.isnan(value)
    kind = type(value)
    if kind.__name__ in _PANDAS_MISSING:
        return True
    if kind.__module__ == "numpy" and kind.__name__.startswith("float"):  # float32, float16
        return bool(value != value)  # (NaN is the one value not equal to itself)
    return False
