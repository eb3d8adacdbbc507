"""Scrutiny: record LangChain and LlamaIndex apps and judge every record, asynchronously.

Importing this package starts no thread, opens no file and reads no environment variable.
"""

from __future__ import annotations

from scrutiny.core import (
    ConfigurationError,
    Feedback,
    FeedbackCall,
    FeedbackError,
    FeedbackMode,
    FeedbackResult,
    FeedbackResults,
    FeedbackStatus,
    FeedbackTimeout,
    InvalidFeedbackValue,
    RateLimit,
    Record,
    RecordingError,
    RecordStatus,
    RetryPolicy,
    ScrutinyError,
    Select,
    Selector,
    Session,
    SkipFeedback,
    Span,
    SpanKind,
    StorageError,
    TokenUsage,
    TransientError,
)

__version__ = "0.1.0"

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
    "Record",
    "RecordStatus",
    "RecordingError",
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
    "__version__",
]
