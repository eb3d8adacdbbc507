"""What the dashboard's JSON API answers, computed only through the public `Session` API.

Every function here takes a :class:`Session` and plain arguments and returns plain,
JSON-ready values, so the page and the API can never disagree with `Session` itself: the
leaderboard is `Session.get_leaderboard()` (its order and means) with the per-feedback
counts of `Session.get_feedback_summary()`; records come from `Session.query_records()` and
`Session.get_record()`; the charts sample `Session.get_records_and_feedback()`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from scrutiny.core import FeedbackResult, Record, Session
from scrutiny.core._frames import result_labels
from scrutiny.core._records import app_id_for
from scrutiny.core._serialize import dumps, to_jsonable

__all__ = [
    "PREVIEW_CHARS",
    "apps",
    "charts",
    "leaderboard",
    "preview",
    "record_detail",
    "record_summary",
    "records_page",
]

PREVIEW_CHARS = 240
"""The longest input or output preview in a page of records."""

_STATUSES = ("done", "pending", "running", "failed", "skipped")
_LARGEST = sys.float_info.max


def _number(value: Any) -> float | None:
    """A finite float, or None for missing, NaN and infinities."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _iso(moment: datetime | float | None) -> str | None:
    if moment is None:
        return None
    if isinstance(moment, int | float):
        moment = datetime.fromtimestamp(moment, tz=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


REASON_CHARS = 200
"""How much of a result's reason the records list gets (shown on hover)."""


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """A one-line text of an input or output, cut to `limit` characters."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else dumps(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


# ---------------------------------------------------------------------- apps & leaderboard
def apps(session: Session) -> list[dict[str, Any]]:
    """Every app version with its record count, mean latency and mean tokens."""
    return [{
        "app_id": a["app_id"], "app_name": a["app_name"], "app_version": a["app_version"],
        "records": int(a["records"]), "latency": _number(a.get("latency")),
        "total_tokens": _number(a.get("total_tokens")),
    } for a in session.get_apps()]


def leaderboard(session: Session, app_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """App versions (best first) x feedbacks: mean of done scores with counts by status.

    Returns:
        ``{"feedbacks": [{"name", "higher_is_better"}], "rows": [{"app_id", "app_name",
        "app_version", "records", "latency", "total_tokens", "pending", "running",
        "failed", "skipped", "scores": {name: {"mean", "done", "pending", "running",
        "failed", "skipped"}}}]}``. A mean is None while no result of that feedback is done.
    """
    ids = list(app_ids) if app_ids else None
    board = session.get_leaderboard(ids)
    summary = session.get_feedback_summary(ids)
    directions: dict[str, bool] = {e["feedback_name"]: bool(e["higher_is_better"])
                                   for e in summary}
    directions.update(board.attrs.get("higher_is_better", {}))
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in summary:
        cells[(entry["app_id"], entry["feedback_name"])] = {
            "mean": _number(entry["mean"]), **{st: int(entry.get(st, 0)) for st in _STATUSES}}
    names = sorted(directions)
    rows = []
    for index, row in board.iterrows():
        app_name, app_version = str(index[0]), str(index[1])  # type: ignore[index]
        app_id = app_id_for(app_name, app_version)  # (the id the summary's cells carry)
        scores = {}
        for name in names:
            cell = cells.get((app_id, name))
            if cell is not None:
                cell["mean"] = _number(row.get(name, cell["mean"]))
                scores[name] = cell
        rows.append({
            "app_id": app_id, "app_name": app_name, "app_version": app_version,
            "records": int(row["records"]), "latency": _number(row["latency"]),
            "total_tokens": _number(row["total_tokens"]),
            **{st: int(row[st]) for st in ("pending", "running", "failed", "skipped")},
            "scores": scores,
        })
    return {"feedbacks": [{"name": n, "higher_is_better": directions[n]} for n in names],
            "rows": rows}


# ---------------------------------------------------------------------- records
def _result_summary(result: FeedbackResult) -> dict[str, Any]:
    # (with the reason's first words: the list showed a "failed" badge and no why, and a
    # lead opened every record one at a time to find it)
    why = result.error if result.status.value in ("failed", "skipped") else \
        result.explanation
    return {"status": result.status.value, "score": _number(result.result),
            "reason": preview(why, REASON_CHARS) if why else None}


def _results(record: Record) -> list[FeedbackResult]:
    return sorted(record.feedback_results.values(), key=lambda r: r.feedback_name)


def record_summary(record: Record) -> dict[str, Any]:
    """One row of the records table: previews, timing and each feedback's status and score."""
    usage = record.usage
    return {
        "record_id": record.record_id,
        "app_id": record.app_id,
        "app_name": record.app_name,
        "app_version": record.app_version,
        "status": record.status.value,
        "error": preview(record.error) if record.error else None,
        "start_time": _iso(record.start_time),
        "latency": _number(record.latency),
        "total_tokens": usage.total_tokens if usage else None,
        "input_preview": preview(record.input),
        "output_preview": preview(record.output),
        "feedback": _labelled(_results(record)),
    }


def _labelled(results: list[FeedbackResult]) -> dict[str, dict[str, Any]]:
    """Each result under its feedback's name; a second result of one name (stored by
    older releases) as ``"name (2)"``, as in :meth:`Session.get_records_and_feedback` (keyed
    by name, the last one hid the others: a failed result over the done score)."""
    names = [r.feedback_name for r in results]
    return {label: _result_summary(r)
            for label, r in zip(result_labels(names, set(names)), results, strict=True)}


def records_page(session: Session, **filters: Any) -> dict[str, Any]:
    """A page of :meth:`Session.query_records` with `filters` passed through."""
    page = session.query_records(**filters, details=False)  # (previews: no span trees)
    return {"records": [record_summary(r) for r in page.records], "total": page.total,
            "limit": page.limit, "offset": page.offset}


def _result_detail(result: FeedbackResult) -> dict[str, Any]:
    return {
        "feedback_name": result.feedback_name,
        "status": result.status.value,
        "score": _number(result.result),
        "explanation": result.explanation,
        "error": result.error,
        "attempts": result.attempts,
        "created_at": _iso(result.created_at),
        "started_at": _iso(result.started_at),
        "ended_at": _iso(result.ended_at),
        "latency": _number(result.latency),
        "cost": to_jsonable(result.cost),
        "calls": [to_jsonable(c.as_dict()) for c in result.calls],
    }


def record_detail(record: Record) -> dict[str, Any]:
    """One record with its span tree (depth first, with offsets for a waterfall), inputs,
    outputs, retrieved contexts and every feedback result."""
    starts = [s.start_time for s in record.spans if s.start_time]
    origin = min([record.start_time, *starts]) if record.start_time else min(starts, default=0)
    ends = [s.end_time for s in record.spans if s.end_time is not None]
    total = max([record.end_time, *ends], default=origin) - origin
    spans = []
    for depth, span in record.walk():
        end = span.end_time
        spans.append({
            "span_id": span.span_id,
            "parent_id": span.parent_id,
            "depth": depth,
            "name": span.name,
            "kind": str(span.kind),
            "start_time": _iso(span.start_time),
            "end_time": _iso(end),
            "offset_ms": _number((span.start_time - origin) * 1000),
            # (never negative: a clock set back during the step ended it before its start)
            "duration_ms": None if end is None else _number(max(0.0, end - span.start_time)
                                                            * 1000),
            "inputs": to_jsonable(span.inputs),
            "outputs": to_jsonable(span.outputs),
            "error": span.error,
            "usage": span.usage.as_dict() if span.usage else None,
            "model": span.model,
        })
    results = [_result_detail(r) for r in _results(record)]
    return {
        "record_id": record.record_id,
        "app_id": record.app_id,
        "app_name": record.app_name,
        "app_version": record.app_version,
        "status": record.status.value,
        "error": record.error,
        "start_time": _iso(record.start_time),
        "end_time": _iso(record.end_time),
        "latency": _number(record.latency),
        "total_ms": _number(total * 1000),
        "usage": record.usage.as_dict() if record.usage else None,
        "input": to_jsonable(record.input),
        "output": to_jsonable(record.output),
        "contexts": to_jsonable(record.contexts),
        "tags": to_jsonable(record.tags),
        "metadata": to_jsonable(record.metadata),
        "framework": record.framework,
        "spans": spans,
        "feedback": results,
        "final": all(r.is_final for r in record.feedback_results.values()),
    }


# ---------------------------------------------------------------------- charts
def _bounds(values: list[float]) -> tuple[float, float]:
    """The histogram's range: [0, 1] for scores in it, else the scores' own (never empty,
    never past the largest float: one score of 1e308 has a range around it too)."""
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    if lo == hi:  # (0.5 either side, or more where 0.5 is below the float's precision)
        pad = max(0.5, abs(lo) * 2.0 ** -20)
        return max(lo - pad, -_LARGEST), min(hi + pad, _LARGEST)
    return lo, hi


def _halving(lo: float, hi: float) -> float:
    """1.0, or 0.5 where hi - lo is past the largest float (-1e308 to 1e308): values and
    bounds are then halved before they are subtracted (an inf width put every score in no
    bin, and failed the charts)."""
    return 1.0 if math.isfinite(hi - lo) else 0.5


def _histogram(values: list[float], lo: float, hi: float, bins: int) -> list[int]:
    counts = [0] * bins
    k = _halving(lo, hi)
    width = (hi * k - lo * k) / bins
    for v in values:
        i = math.floor((v * k - lo * k) / width + 1e-9) if width > 0 else 0  # 0.3: [0.3, 0.4)
        counts[min(max(i, 0), bins - 1)] += 1
    return counts


def _mean(values: list[float]) -> float | None:
    """The mean of finite `values`, even where their sum is past the largest float (1e308
    and 1.5e308: 1.25e308, not an overflow)."""
    if not values:
        return None
    try:
        return _number(math.fsum(values) / len(values))
    except OverflowError:
        return _number(math.fsum(v / len(values) for v in values))


def _newest_start(session: Session, app_id: str) -> float:
    """When the newest record of app version `app_id` started (epoch seconds)."""
    page = session.query_records(app_ids=[app_id], limit=1, details=False)
    return page.records[0].start_time if page.records else float("-inf")


def charts(session: Session, app_ids: Sequence[str] | None = None,
           app_versions: Sequence[str] | None = None, *, sample: int = 500,
           bins: int = 10, max_versions: int = 12) -> dict[str, Any]:
    """Score distributions per app version and latency over time, from a sample.

    The sample is the newest `sample` records of each app version (through
    :meth:`Session.get_records_and_feedback`), of at most `max_versions` versions: the
    newest ones, by their latest record.

    Returns:
        ``{"sample", "bins", "truncated", "versions": [{"app_id", "app_name",
        "app_version", "sampled"}], "distributions": {feedback: {"lo", "hi", "versions":
        [{"app_id", "counts", "n", "mean"}]}}, "latency": [{"app_id", "points": [[epoch
        seconds, latency seconds], ...]}]}``.
    """
    versions = session.get_apps()
    if app_ids:  # the versions the session's own filter selects (an app id is one app)
        chosen = set(session.get_leaderboard(list(app_ids)).index)
        versions = [a for a in versions if (a["app_name"], a["app_version"]) in chosen]
    if app_versions:
        versions = [a for a in versions if a["app_version"] in app_versions]
    truncated = len(versions) > max_versions
    if truncated:  # (the newest versions, by their latest record; they were the first 12
        # in text order — v1, v10-v15, v2-v6 — the newest left out and the oldest kept.
        # One indexed read per version, and only past the limit: a newest-record column in
        # the app aggregates made the leaderboard's covering index miss, 3x slower.)
        newest = sorted(versions, key=lambda a: _newest_start(session, a["app_id"]),
                        reverse=True)[:max_versions]
        versions = [a for a in versions if a in newest]
    scores: dict[str, dict[str, list[float]]] = {}
    latency = []
    sampled = []
    for app in versions:
        frame, feedback_columns = session.get_records_and_feedback([app["app_id"]],
                                                                   limit=sample)
        sampled.append({"app_id": app["app_id"], "app_name": app["app_name"],
                        "app_version": app["app_version"], "sampled": len(frame)})
        for name in feedback_columns:
            done = frame[frame[name + " status"] == "done"][name]
            scores.setdefault(name, {})[app["app_id"]] = [float(v) for v in done.dropna()]
        points = []
        if not frame.empty:
            times = frame["start_time"].map(lambda t: t.timestamp())
            points = [[round(float(t), 3), round(float(lat), 6)]
                      for t, lat in zip(times, frame["latency"], strict=True)
                      if _number(lat) is not None]
        points.sort()
        latency.append({"app_id": app["app_id"], "points": points})
    distributions = {}
    for name in sorted(scores):
        every = [v for vs in scores[name].values() for v in vs]
        if not every:  # nothing done yet: no distribution to draw
            continue
        lo, hi = _bounds(every)
        distributions[name] = {"lo": lo, "hi": hi, "versions": [{
            "app_id": app_id, "counts": _histogram(values, lo, hi, bins), "n": len(values),
            "mean": _mean(values),
        } for app_id, values in scores[name].items()]}
    return {"sample": sample, "bins": bins, "truncated": truncated, "versions": sampled,
            "distributions": distributions, "latency": latency}
