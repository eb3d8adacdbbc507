"""Feedback results and their statuses.

Every (record, feedback) pair has exactly one result row from the moment the record is
stored. Its status says where it is: `pending` (stored, not started), `running`, then one of
the end states `done` (a score), `failed` (a reason, never a score) or `skipped` (a reason,
never a score). A score of None therefore always comes with a status that explains it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from scrutiny.core._serialize import to_jsonable

__all__ = ["FeedbackCall", "FeedbackResult", "FeedbackStatus"]


class FeedbackStatus(str, enum.Enum):
    """Where a feedback result is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"

    @property
    def is_final(self) -> bool:
        return self in (FeedbackStatus.DONE, FeedbackStatus.FAILED, FeedbackStatus.SKIPPED)

    def __str__(self) -> str:
        return self.value


@dataclass(slots=True)
class FeedbackCall:
    """One call of the feedback function (one per element when a selector fans out)."""

    args: dict[str, Any]
    score: float | None = None
    explanation: str | None = None
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "args": self.args,
            "score": self.score,
            "explanation": self.explanation,
            "error": self.error,
            "metadata": self.metadata,
        }


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(slots=True)
class FeedbackResult:
    """The outcome of one feedback on one record.

    `result` is the score (the name users of other tools already write); it is a float only
    when `status` is `done`. `explanation` holds the judge's reasons, `error` the reason of a
    `failed` or `skipped` result.
    """

    record_id: str
    feedback_name: str
    status: FeedbackStatus = FeedbackStatus.PENDING
    result: float | None = None
    explanation: str | None = None
    error: str | None = None
    attempts: int = 0
    created_at: datetime = field(default_factory=_utcnow)
    started_at: datetime | None = None
    ended_at: datetime | None = None
    cost: dict[str, Any] | None = None
    calls: list[FeedbackCall] = field(default_factory=list)
    result_id: str | None = None
    feedback_id: str | None = None

    def evolve(self, **changes: Any) -> FeedbackResult:
        """A copy with some fields changed (a cheaper `dataclasses.replace`)."""
        values: dict[str, Any] = {
            "record_id": self.record_id, "feedback_name": self.feedback_name,
            "status": self.status, "result": self.result, "explanation": self.explanation,
            "error": self.error, "attempts": self.attempts, "created_at": self.created_at,
            "started_at": self.started_at, "ended_at": self.ended_at, "cost": self.cost,
            "calls": self.calls, "result_id": self.result_id, "feedback_id": self.feedback_id,
        }
        values.update(changes)
        return FeedbackResult(**values)

    def __repr__(self) -> str:
        # (short: the generated one held every call's arguments — a judge's prompt with
        # its contexts — and pytest's assertion diff, a notebook's output, a log line
        # showed the prompt and cut off the status and the score)
        shown = [f"{self.feedback_name!r}", f"status={self.status.value!r}"]
        if self.result is not None:
            shown.append(f"result={self.result!r}")
        for name in ("error", "explanation"):
            text = getattr(self, name)
            if text:
                shown.append(f"{name}={repr_cut(text)!r}")
        if self.attempts > 1:
            shown.append(f"attempts={self.attempts}")
        shown.append(f"record_id={self.record_id!r}")
        return f"FeedbackResult({', '.join(shown)})"

    @property
    def score(self) -> float | None:
        """Alias of :attr:`result`."""
        return self.result

    @property
    def latency(self) -> float | None:
        """Seconds the evaluation took, from its first attempt to its end."""
        if self.started_at is None or self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()

    @property
    def is_final(self) -> bool:
        return self.status.is_final

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (used by the LangChain and LlamaIndex surfacing events):
        `json.dumps` takes it. Each call's arguments and the cost are in the form they
        are stored in (an app's pydantic model as its fields): raw, a handler forwarding
        the event as JSON raised TypeError."""
        return {
            "result_id": self.result_id,
            "record_id": self.record_id,
            "feedback_name": self.feedback_name,
            "feedback_id": self.feedback_id,
            "status": self.status.value,
            "result": self.result,
            "score": self.result,
            "explanation": self.explanation,
            "error": self.error,
            "attempts": self.attempts,
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "cost": None if self.cost is None else to_jsonable(self.cost),
            "calls": to_jsonable([c.as_dict() for c in self.calls]) if self.calls else [],
        }


REPR_TEXT = 160
"""The most characters of a text field a repr shows."""


def repr_cut(text: str, most: int = REPR_TEXT) -> str:
    """`text` cut to `most` characters for a repr (the cut marked with "...")."""
    return text if len(text) <= most else text[:most - 3] + "..."
