"""Feedback functions importable by worker processes in the tests."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path


def length(output: str) -> float:
    return min(1.0, len(str(output)) / 100)


async def slow_async(output: str) -> float:
    await asyncio.sleep(0.05)
    return 0.5


def slow_sync(output: str) -> float:
    time.sleep(0.05)
    return 0.5


def marks_calls(output: str) -> float:
    """Appends one line per call to the file named by $SCRUTINY_TEST_CALLS (exactly-once)."""
    path = os.environ.get("SCRUTINY_TEST_CALLS")
    if path:
        with Path(path).open("a") as f:
            f.write(f"{output}\n")
    return 1.0


def hangs_once(output: str) -> float:
    """Blocks for a long time when $SCRUTINY_TEST_HANG names an existing file (then removes
    it, so the next evaluation is quick)."""
    flag = os.environ.get("SCRUTINY_TEST_HANG")
    if flag:
        try:
            Path(flag).unlink()  # atomic: only one concurrent call wins the hang
        except FileNotFoundError:
            return 0.75
        Path(flag + ".started").write_text(str(os.getpid()))
        time.sleep(60)
    return 0.75


def first_word(value: object) -> str:
    return str(value).split()[0]


def slow_forever_unless_resumed(output: str) -> float:
    """Hangs unless $SCRUTINY_TEST_RESUMED is set (set by the test before resuming)."""
    if not os.environ.get("SCRUTINY_TEST_RESUMED"):
        time.sleep(60)
    return 1.0


def worker_pid(output: str) -> float:
    """The process id of whoever evaluated it."""
    return float(os.getpid())


def output_kind(output: object) -> tuple[float, str]:
    """Says what type the feedback was given (live object, or its stored JSON form)."""
    return 1.0, type(output).__name__


def takes_a_while(output: str) -> float:
    """A plain feedback whose work takes 0.4 s (a model call, say)."""
    time.sleep(0.4)
    return 1.0


def hangs(output: str) -> float:
    """A plain feedback that does not come back in any reasonable time."""
    time.sleep(30)
    return 1.0
