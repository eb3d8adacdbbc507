"""Shared helpers for the benchmarks (run by `make bench`, not by the tests).

Each benchmark prints exactly one JSON line to stdout; anything else goes to stderr.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

# Keep the library's own warnings (if any) off stdout: stdout carries one JSON line.
logging.basicConfig(stream=sys.stderr, level=logging.WARNING)


def make_chain() -> Any:
    """The 3-step LCEL chain: prompt | FakeListChatModel | StrOutputParser()."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate.from_template("Answer briefly: {question}")
    model = FakeListChatModel(responses=["Paris is the capital of France.",
                                         "Forty-two.", "Blue."])
    return prompt | model | StrOutputParser()


@contextlib.contextmanager
def temp_db(name: str = "bench.sqlite") -> Iterator[str]:
    """A SQLAlchemy URL of a fresh SQLite file in a temporary folder (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="scrutiny-bench-") as folder:
        yield f"sqlite:///{os.path.join(folder, name)}"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    data = sorted(values)
    if not data:
        return float("nan")
    if len(data) == 1:
        return data[0]
    k = (len(data) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def status_counts(database_url: str) -> dict[str, int]:
    """Result rows by status, read through a *fresh* Session on the same database file."""
    from scrutiny import Session

    reader = Session(database_url)
    try:
        _, results = reader.store.records_and_results()
    finally:
        reader.close()
    counts: dict[str, int] = {}
    for row in results:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


def emit(payload: dict[str, Any]) -> None:
    """Print the benchmark's single JSON line."""
    sys.stdout.write(json.dumps(payload, sort_keys=False) + "\n")
    sys.stdout.flush()


def r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


class FullCollections:
    """Counts the garbage collector's full (oldest-generation) passes while it is open.

    Entering also runs one full collection first, outside the timed window: a full pass
    scans every object of the process (70-130 ms here with LangChain, SQLAlchemy and pandas
    loaded), and it comes when enough objects have been promoted since the last one, so
    without it the garbage of the runs before (their sessions, readers and DataFrames)
    decided which timed run paid for it. A full pass the run itself causes is still inside
    the window, and counted.
    """

    def __init__(self) -> None:
        self.count = 0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 2:
            self.count += 1

    def __enter__(self) -> FullCollections:
        gc.collect()
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._on_gc)
