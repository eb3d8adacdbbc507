"""Surfacing: each stored feedback result as a LlamaIndex instrumentation event."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
from llama_index.core.instrumentation.events import BaseEvent

from scrutiny.core import FeedbackResult, Record

__all__ = ["FeedbackEventBridge", "FeedbackResultEvent"]


class FeedbackResultEvent(BaseEvent):
    """A feedback result of a recorded call, stored and final (done, failed or skipped).

    Dispatched through LlamaIndex's root dispatcher, on a Scrutiny thread, after the result
    is in the database; `span_id` (and `root_span_id`) is the id of the recorded call's
    root span, `tags` its instrument tags.
    """

    record_id: str
    feedback_name: str
    status: str
    score: float | None = None
    explanation: str | None = None
    error: str | None = None
    root_span_id: str | None = None
    app_name: str | None = None
    app_version: str | None = None

    @classmethod
    def class_name(cls) -> str:
        return "FeedbackResultEvent"


class FeedbackEventBridge:
    """A session result listener that dispatches a :class:`FeedbackResultEvent`."""

    __slots__ = ("root_span_id", "tags")

    def __init__(self, root_span_id: str, tags: Mapping[str, Any]) -> None:
        self.root_span_id = root_span_id
        self.tags = dict(tags)

    @property
    def __scrutiny_name__(self) -> str:
        """What a slow-callback warning names: the app's event handlers, not this bridge."""
        handlers = getattr(get_dispatcher(), "event_handlers", None) or ()
        return "LlamaIndex event handler " + ", ".join(
            sorted({type(h).__qualname__ for h in handlers}))

    def __call__(self, result: FeedbackResult, record: Record) -> None:
        event = FeedbackResultEvent(
            span_id=self.root_span_id,
            tags=dict(self.tags),
            record_id=result.record_id,
            feedback_name=result.feedback_name,
            status=result.status.value,
            score=result.result,
            explanation=result.explanation,
            error=result.error,
            root_span_id=self.root_span_id,
            app_name=record.app_name,
            app_version=record.app_version,
        )
        get_dispatcher().event(event)
