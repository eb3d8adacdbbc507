"""Scrutiny's framework-agnostic core: records, feedback, evaluation, storage, sessions.

Nothing in here imports LangChain or LlamaIndex.
"""

from __future__ import annotations

from scrutiny.core import _records
from scrutiny.core._context import (
    add_evaluation_cost,
    rate_limit_held,
    recording_suppressed,
    suppress_recording,
)
from scrutiny.core._errors import (
    ConfigurationError,
    FeedbackError,
    FeedbackTimeout,
    InvalidFeedbackValue,
    RecordingError,
    ScrutinyError,
    SkipFeedback,
    StorageError,
    TransientError,
)
from scrutiny.core._feedback import Feedback, RateLimit, RetryPolicy, feedback_defaults
from scrutiny.core._recording import RecorderSettings, Recording
from scrutiny.core._records import (
    FeedbackResults,
    LazyRecord,
    Record,
    RecordStatus,
    Span,
    SpanKind,
    TokenUsage,
)
from scrutiny.core._results import FeedbackCall, FeedbackResult, FeedbackStatus
from scrutiny.core._select import Select, Selector
from scrutiny.core._session import FeedbackMode, ResultListener, Session

# (typing.get_type_hints(Record) — what dataclass tools, pydantic and FastAPI call — looks
# names up in the module: Feedback is imported there for type checkers only, as it imports
# that module itself)
vars(_records)["Feedback"] = Feedback

__all__ = [
    "ConfigurationError",
    "Feedback",
    "FeedbackCall",
    "FeedbackError",
    "FeedbackMode",
    "FeedbackResult",
    "FeedbackResults",
    "FeedbackStatus",
    "FeedbackTimeout",
    "InvalidFeedbackValue",
    "RateLimit",
    "LazyRecord",
    "Record",
    "RecordStatus",
    "RecorderSettings",
    "Recording",
    "RecordingError",
    "ResultListener",
    "RetryPolicy",
    "ScrutinyError",
    "Select",
    "Selector",
    "Session",
    "SkipFeedback",
    "Span",
    "SpanKind",
    "StorageError",
    "TokenUsage",
    "TransientError",
    "add_evaluation_cost",
    "feedback_defaults",
    "rate_limit_held",
    "recording_suppressed",
    "suppress_recording",
]
