"""The public surface is pinned: growing or shrinking it is a deliberate change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import scrutiny


def test_top_level_exports() -> None:
    assert scrutiny.__all__ == [
        "ConfigurationError", "Feedback", "FeedbackCall", "FeedbackError", "FeedbackMode",
        "FeedbackResult", "FeedbackResults", "FeedbackStatus", "FeedbackTimeout",
        "InvalidFeedbackValue", "RateLimit", "Record", "RecordStatus", "RecordingError",
        "RetryPolicy", "ScrutinyError", "Select", "Selector", "Session", "SkipFeedback",
        "Span", "SpanKind", "StorageError", "TokenUsage", "TransientError", "__version__",
    ]
    for name in scrutiny.__all__:
        assert hasattr(scrutiny, name)


def test_the_public_enums_print_as_their_values() -> None:
    """`print(record.status)` showed "RecordStatus.OK" where `FeedbackStatus` showed
    "done": one way for every enum a user prints or formats into a report."""
    for enum_type in (scrutiny.FeedbackStatus, scrutiny.RecordStatus, scrutiny.SpanKind,
                      scrutiny.FeedbackMode):
        for member in enum_type:
            assert str(member) == f"{member}" == member.value
            assert "%s" % member == member.value  # noqa: UP031 (as logging formats it)


def test_type_hints_of_the_public_classes_resolve_at_run_time() -> None:
    """typing.get_type_hints(Record) — what dataclass tools, pydantic and FastAPI call —
    raised NameError: name 'Feedback' is not defined (Selector's __init__: 'Record')."""
    import inspect
    import typing

    from scrutiny.integrations.langchain import ChainRecorder, ScrutinyCallbackHandler

    classes = [getattr(scrutiny, n) for n in scrutiny.__all__
               if inspect.isclass(getattr(scrutiny, n))]
    assert len(classes) > 20
    for cls in [*classes, ChainRecorder, ScrutinyCallbackHandler]:
        typing.get_type_hints(cls)
        typing.get_type_hints(cls.__init__)
    assert typing.get_type_hints(scrutiny.Record)["spans"] == list[scrutiny.Span]


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


def test_type_checkers_see_the_package_types(tmp_path: Path) -> None:
    """Without a `py.typed` marker, `mypy --strict` refused to read the package
    ("missing library stubs or py.typed marker") and typed everything from it as Any."""
    user = tmp_path / "user.py"
    user.write_text(
        "from scrutiny import Feedback, Record, Session\n"
        "session = Session('sqlite:///x.sqlite')\n"
        "record = session.ingest(Record(app_name='a', app_version='v'), [])\n"
        "reveal_type(record.wait_for_feedback_results(timeout=1))\n"
        "reveal_type(Feedback(lambda output: 1.0, name='n').on_output())\n"
        # (the forms the README documents, which the fields' own types refused)
        "import datetime\n"
        "when = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)\n"
        "hand_made = Record(app_name='batch', app_version='1', record_id=1041,\n"
        "    error=ValueError('boom'), usage={'prompt_tokens': 3}, start_time=when,\n"
        "    end_time=when, status='error', spans=[{'span_id': 's', 'parent_id': None,\n"
        "    'name': 'llm', 'kind': 'llm', 'start_time': 1.0}])\n"
        "reveal_type(hand_made.error)\n")
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir",
         str(tmp_path / "cache"), str(user)], capture_output=True, text=True, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout
    assert 'Revealed type is "scrutiny.core._records.FeedbackResults"' in checked.stdout
    assert 'Revealed type is "scrutiny.core._feedback.Feedback"' in checked.stdout
    assert 'Revealed type is "str | None"' in checked.stdout  # (the field, read back)
