"""The public surface is pinned: growing or shrinking it is a deliberate change."""

from __future__ import annotations

import subprocess
import sys

import scrutiny


def test_top_level_exports() -> None:
    assert scrutiny.__all__ == [
        "ConfigurationError", "Feedback", "FeedbackCall", "FeedbackError", "FeedbackMode",
        "FeedbackResult", "FeedbackStatus", "FeedbackTimeout", "InvalidFeedbackValue",
        "RateLimit", "Record", "RecordStatus", "RecordingError", "RetryPolicy",
        "ScrutinyError", "Select", "Selector", "Session", "SkipFeedback", "Span", "SpanKind",
        "StorageError", "TokenUsage", "TransientError", "__version__",
    ]
    for name in scrutiny.__all__:
        assert hasattr(scrutiny, name)


def test_langchain_exports() -> None:
    from scrutiny.integrations import langchain

    assert sorted(langchain.__all__) == [
        "ChainRecorder", "FEEDBACK_EVENT", "Recording", "ScrutinyCallbackHandler"]


def test_importing_starts_no_thread_and_opens_no_file() -> None:
    code = (
        "import threading, os, sys\n"
        "before = set(os.listdir(f'/proc/{os.getpid()}/fd'))\n"
        "import scrutiny, scrutiny.integrations.langchain\n"
        "after = set(os.listdir(f'/proc/{os.getpid()}/fd'))\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "print(len(after - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "0"


def test_core_imports_no_framework() -> None:
    code = (
        "import sys, scrutiny, scrutiny.core\n"
        "bad = [m for m in sys.modules if m.startswith(('langchain', 'llama_index'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
