"""Turning records and results into storage rows and back (off the application's thread)."""

from __future__ import annotations

import base64
import re
import zlib
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from scrutiny.core import _serialize
from scrutiny.core._records import Record, RecordStatus, Span, TokenUsage, app_id_for
from scrutiny.core._results import FeedbackCall, FeedbackResult, FeedbackStatus
from scrutiny.core.storage import Row

if TYPE_CHECKING:
    from scrutiny.core._feedback import Feedback

__all__ = [
    "app_row",
    "definition_row",
    "holds_truncation",
    "record_from_row",
    "record_row",
    "result_from_row",
    "result_row",
    "result_update_values",
    "spans_text",
    "truncated_selection",
    "truncation",
]


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _text(value: str | None) -> str | None:
    """`value` as storable text: a lone surrogate (what Python makes of undecodable bytes,
    e.g. a file name, with ``surrogateescape``) cannot be encoded as UTF-8, and the
    database refused the whole row — the record or result was lost. It is kept as a
    backslash escape."""
    if value is None or value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _span_dict(span: Span) -> dict[str, Any]:
    return {
        "span_id": span.span_id,
        "parent_id": span.parent_id,
        "name": span.name,
        "kind": str(getattr(span.kind, "value", span.kind)),
        "start_time": span.start_time,
        "end_time": span.end_time,
        "inputs": span.inputs,
        "outputs": span.outputs,
        "error": span.error,
        "usage": span.usage.as_dict() if span.usage else None,
        "model": span.model,
        "tags": span.tags,
        "metadata": span.metadata,
    }


COMPRESS_SPANS_OVER = 8192
"""Span trees longer than this (characters of JSON) are stored compressed where the
database does not compress them itself (SQLite; PostgreSQL's TOAST does)."""
_COMPRESSED = "zlib:"  # (no JSON text starts with a letter other than t, f, n)


_SPAN_PARTS = ("inputs", "outputs", "metadata")


def _spans_json(spans: list[Span], max_bytes: int, compress: bool = False) -> str:
    """The span tree as JSON within `max_bytes`: when it is over, each span's inputs,
    outputs and metadata (and error) are cut to a share of it (with truncation markers)
    rather than the whole tree replaced by one marker.

    Each part is encoded once, with one memo for the whole record: the steps of a LangGraph
    loop each hold the state so far, and each part was encoded with a memo of its own (and
    the whole tree once more, to be thrown away), so each message was converted once per
    span holding it — 252,503 pydantic dumps for 500 iterations' ~500 messages, seconds of
    the writer's CPU growing with the square of the loop.

    With `compress`, a long one is stored as ``zlib:`` and its deflated JSON in base64:
    a LangGraph chat's node spans each hold the whole conversation so far, so its records
    grew with the square of its turns (4.5 MB for 60 turns of a two-node graph; 0.3 MB
    compressed, for about 0.1 ms of the writer's time per record)."""
    memo = _serialize.Memo()
    dicts = [_span_dict(s) for s in spans]
    share = max(1024, max_bytes // (3 * max(1, len(dicts))))

    def encoded(part: Any) -> bytes:  # (a text over the tree's budget alone is cut now)
        if isinstance(part, str) and len(part) > max_bytes:
            return _serialize.encode_within(part, share)
        return _serialize.encode(part, memo)

    parts = [[encoded(d[key]) for key in _SPAN_PARTS] for d in dicts]
    whole = [{**d, **{key: _serialize.fragment(data) for key, data in zip(
        _SPAN_PARTS, done, strict=True)}} for d, done in zip(dicts, parts, strict=True)]
    data = _serialize.encode(whole, memo)
    if len(data) > max_bytes:
        for d, done in zip(dicts, parts, strict=True):
            for key, part in zip(_SPAN_PARTS, done, strict=True):
                d[key] = _serialize.fragment(_serialize.cut(d[key], part, share))
            if isinstance(d["error"], str):
                d["error"] = _serialize.truncate_text(d["error"], share)
        data = _serialize.cut(dicts, _serialize.encode(dicts, memo), max_bytes)
    text = data.decode("utf-8")
    if compress and len(text) > COMPRESS_SPANS_OVER:
        packed = zlib.compress(data, 1)
        return _COMPRESSED + base64.b64encode(packed).decode("ascii")
    return text


def spans_text(stored: Any) -> Any:
    """A record row's ``spans_json`` as JSON text (decompressed if it was stored so)."""
    if isinstance(stored, str) and stored.startswith(_COMPRESSED):
        packed = base64.b64decode(stored[len(_COMPRESSED):])
        return zlib.decompress(packed).decode("utf-8", "surrogatepass")
    return stored


def app_row(record: Record) -> Row:
    return {
        "app_id": _text(record.app_id),
        "app_name": _text(record.app_name),
        "app_version": _text(record.app_version),
        "metadata_json": None,
        "created_at": datetime.now(timezone.utc),
    }


def record_row(record: Record, *, max_bytes: int, compress_spans: bool = False) -> Row:
    usage = record.usage
    return {
        "record_id": record.record_id,
        "app_id": _text(record.app_id),
        "app_name": _text(record.app_name),
        "app_version": _text(record.app_version),
        "status": record.status._value_,
        "input_json": _serialize.dumps(record.input, max_bytes=max_bytes),
        "output_json": _serialize.dumps(record.output, max_bytes=max_bytes),
        # (cut as results' errors are: a 20 MB exception message was stored whole)
        "error": _message(record.error, max_bytes),
        "start_time": _utc(record.start_time),
        "end_time": _utc(record.end_time),
        "latency_s": record.latency,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "total_tokens": usage.total_tokens if usage else None,
        "spans_json": _spans_json(record.spans, max_bytes * 4, compress_spans),
        "contexts_json": _contexts_json(record.contexts, max_bytes),
        "tags_json": _serialize.dumps(record.tags, max_bytes=max_bytes),
        "metadata_json": _serialize.dumps(record.metadata, max_bytes=max_bytes),
        "framework": record.framework,
        "root_run_id": record.root_run_id,
        "created_at": datetime.now(timezone.utc),
    }


def definition_row(feedback: Feedback) -> Row:
    """The definition row of a feedback (built once per feedback object)."""
    cached = feedback.__dict__.get("_definition_row")
    if cached is not None:
        return dict(cached)
    row = {
        "feedback_id": feedback.feedback_id,
        "name": _text(feedback.name),
        "higher_is_better": feedback.higher_is_better,
        "implementation": feedback.implementation,
        "selectors_json": _serialize.dumps(feedback.selectors),
        "created_at": datetime.now(timezone.utc),
        "spec_json": _spec_json(feedback),
    }
    feedback.__dict__["_definition_row"] = row
    return dict(row)


def _spec_json(feedback: Feedback) -> str | None:
    from scrutiny.core._refs import NotReferenceable

    try:
        return _serialize.dumps(feedback.spec())
    except NotReferenceable:
        return None


def _contexts_json(contexts: list[Any], max_bytes: int) -> str:
    """The contexts as a list of texts within the limit *as a whole* (each one cut to the
    limit on its own let 4.5 MB of contexts through a 100 kB limit): each is cut to what
    room is left, and where none is left one marker says how many more there were."""
    if all(type(c) is str for c in contexts) and \
            sum(len(c) for c in contexts) * 4 <= max_bytes:
        return _serialize.dumps(contexts)
    # (contexts of other kinds — dicts of a text and its source — are measured as encoded:
    # estimated, 4.8 MB of them passed a 1 MB limit)
    kept: list[Any] = []
    used = 2 + 96  # the brackets, and room kept for the marker of what did not fit
    for i, context in enumerate(contexts):
        room = max_bytes - used - 1
        whole = room + 1 if isinstance(context, str) and len(context) > room else len(
            _serialize.dumps(context))  # (a text longer than the room is over it)
        if whole <= room:
            kept.append(context)
            used += whole + 1
            continue
        if room < 256:  # (no room for a useful piece: say what is missing instead)
            kept.append(f"[{_serialize.TRUNCATED_KEY}: {len(contexts) - i} more "
                        "context(s) not stored]")
            break
        if not isinstance(context, str):  # (its JSON's marker, with a prefix of it)
            piece = _serialize.loads(_serialize.dumps(context, max_bytes=room))
            kept.append(piece)
            used += len(_serialize.dumps(piece)) + 1
            continue
        piece = _serialize.truncate_text(context, room - 2 - len(_serialize.TRUNCATED_KEY))
        size = len(_serialize.dumps(piece))
        if size > room:  # escapes made it longer than its bytes: cut it once more
            piece = _serialize.truncate_text(context, max(0, room - (size - room) - 64))
            size = len(_serialize.dumps(piece))
        kept.append(piece)
        used += size + 1
    return _serialize.dumps(kept)


def _message(value: str | None, max_bytes: int) -> str | None:
    """An explanation or error as stored: within the payload limit, with the marker."""
    text = _text(value)
    return text if text is None else _serialize.truncate_text(text, max_bytes)


def result_row(record: Record, result: FeedbackResult,
               lease: tuple[str, str, datetime] | None = None, *,
               max_bytes: int = 1_000_000) -> Row:
    """The first row of a result; `lease` = (worker_id, token, expires_at) of its holder."""
    now = datetime.now(timezone.utc)
    return {
        "result_id": result.result_id,
        "record_id": record.record_id,
        "app_id": _text(record.app_id),
        "feedback_id": result.feedback_id,
        "feedback_name": _text(result.feedback_name),
        "status": result.status._value_,
        "score": result.result,
        "explanation": _message(result.explanation, max_bytes),
        "error": _message(result.error, max_bytes),
        "attempts": result.attempts,
        "created_at": result.created_at,
        "started_at": result.started_at,
        "ended_at": result.ended_at,
        "updated_at": now,
        "cost_json": _serialize.dumps(result.cost) if result.cost is not None else None,
        "calls_json": _serialize.dumps([c.as_dict() for c in result.calls])
        if result.calls else None,
        "worker_id": lease[0] if lease else None,
        "lease_token": lease[1] if lease else None,
        "lease_expires_at": lease[2] if lease else None,
    }


def result_update_values(result: FeedbackResult, *, max_bytes: int) -> Row:
    values = {
        "status": result.status._value_,
        "score": result.result,
        "explanation": _message(result.explanation, max_bytes),
        "error": _message(result.error, max_bytes),
        "attempts": result.attempts,
        "started_at": result.started_at,
        "ended_at": result.ended_at,
        "updated_at": datetime.now(timezone.utc),
        "cost_json": _serialize.dumps(result.cost) if result.cost is not None else None,
        "calls_json": _calls_json(result, max_bytes),
    }
    if result.is_final:
        values["lease_expires_at"] = None
    return values


def _calls_json(result: FeedbackResult, max_bytes: int) -> str | None:
    """The calls of a fanned-out feedback (a single call adds nothing the result and its
    record do not already hold, unless it left metadata such as a raw judge answer)."""
    calls = result.calls
    if not calls or (len(calls) == 1 and not calls[0].metadata):
        return None
    return _serialize.dumps([c.as_dict() for c in calls], max_bytes=max_bytes)


def _span_from(d: dict[str, Any]) -> Span:
    usage = d.get("usage")
    return Span(
        span_id=d["span_id"],
        parent_id=d.get("parent_id"),
        name=d.get("name", ""),
        kind=d.get("kind", "other"),
        start_time=d.get("start_time") or 0.0,
        end_time=d.get("end_time"),
        inputs=d.get("inputs"),
        outputs=d.get("outputs"),
        error=d.get("error"),
        usage=TokenUsage(**usage) if usage else None,
        model=d.get("model"),
        tags=d.get("tags") or [],
        metadata=d.get("metadata") or {},
    )


def record_from_row(row: Row) -> Record:
    usage = None
    if any(row.get(k) is not None for k in ("prompt_tokens", "completion_tokens",
                                            "total_tokens")):
        usage = TokenUsage(row.get("prompt_tokens"), row.get("completion_tokens"),
                           row.get("total_tokens"))
    spans = _serialize.loads(spans_text(row.get("spans_json"))) or []
    return Record(
        app_name=row["app_name"],
        app_version=row["app_version"],
        input=_serialize.loads(row.get("input_json")),
        output=_serialize.loads(row.get("output_json")),
        record_id=row["record_id"],
        status=RecordStatus(row["status"]),
        error=row.get("error"),
        start_time=row["start_time"].timestamp(),
        end_time=row["end_time"].timestamp(),
        spans=[_span_from(s) for s in spans] if isinstance(spans, list) else [],
        contexts=_serialize.loads(row.get("contexts_json")) or [],
        usage=usage,
        tags=_serialize.loads(row.get("tags_json")) or [],
        metadata=_serialize.loads(row.get("metadata_json")) or {},
        framework=row.get("framework"),
        root_run_id=row.get("root_run_id"),
    )


def result_from_row(row: Row) -> FeedbackResult:
    calls = _serialize.loads(row.get("calls_json")) or []
    return FeedbackResult(
        record_id=row["record_id"],
        feedback_name=row["feedback_name"],
        status=FeedbackStatus(row["status"]),
        result=row.get("score"),
        explanation=row.get("explanation"),
        error=row.get("error"),
        attempts=row.get("attempts") or 0,
        created_at=row["created_at"],
        started_at=row.get("started_at"),
        ended_at=row.get("ended_at"),
        cost=_serialize.loads(row.get("cost_json")),
        calls=[FeedbackCall(**c) for c in calls] if isinstance(calls, list) else
        # (over max_payload_bytes the calls were stored as the truncation marker: it was
        # read as no calls at all, their metadata gone without a word)
        [FeedbackCall(args={}, metadata=calls)] if isinstance(calls, dict) else [],
        result_id=row["result_id"],
        feedback_id=row.get("feedback_id"),
    )


def app_id(app_name: str, app_version: str) -> str:
    return app_id_for(app_name, app_version)


# ---------------------------------------------------------------------- truncated values
_RECORD_JSON_COLUMNS = ("input_json", "output_json", "contexts_json", "spans_json",
                        "tags_json", "metadata_json")
_CUT_TEXT = re.compile(re.escape(f"[{_serialize.TRUNCATED_KEY}: ")
                       + r"(\d+) (bytes in all|more context\(s\) not stored)\]\Z")
_MAX_DEPTH = _serialize._MAX_DEPTH + 8  # (a level cut at 200 is marked down there)


def holds_truncation(row: Row) -> bool:
    """Whether a stored record row has a value cut at storage anywhere (a cheap look at
    its JSON texts, before anything is selected from it)."""
    key = _serialize.TRUNCATED_KEY
    return any(key in text for c in _RECORD_JSON_COLUMNS
               if isinstance(text := spans_text(row.get(c)), str))


def truncation(value: Any) -> str | None:
    """How `value`, read back from storage, was cut when it was stored (None: it was
    not): a truncation marker in its place or anywhere in it, or a text ending in one."""
    cut = _cut_in(value, 0)
    return None if cut is None else cut[0]


def _cut_in(value: Any, depth: int) -> tuple[str, bool] | None:
    """(how `value` was cut, whether for its size) — or None: it was not."""
    if isinstance(value, dict):
        if value.get(_serialize.TRUNCATED_KEY) is True:
            reason = value.get("reason")  # (a part the serializer could not store as is)
            if isinstance(reason, str):
                return reason, False
            whole = value.get("original_bytes")
            preview = value.get("preview")
            kept = len(preview.encode("utf-8", "backslashreplace")) if isinstance(
                preview, str) else 0
            return (f"{whole} bytes stored as a truncation marker keeping a preview of "
                    f"{kept} bytes"), True
        items: Any = value.values()
    elif isinstance(value, list | tuple):
        items = value
    elif isinstance(value, str):
        if _serialize.TRUNCATED_KEY not in value:
            return None
        found = _CUT_TEXT.search(value)
        if found is None:
            return None
        if found.group(2) != "bytes in all":
            return f"{found.group(1)} more context(s) were not stored", True
        kept = len(value[:found.start()].encode("utf-8", "backslashreplace"))
        return f"a text of {found.group(1)} bytes cut to its first {kept}", True
    else:
        return None
    if depth >= _MAX_DEPTH:
        return None
    for item in items:
        cut = _cut_in(item, depth + 1)
        if cut is not None:
            return cut
    return None


def truncated_selection(feedback: Feedback, record: Record) -> str | None:
    """Why `feedback` must not be evaluated on `record` as stored: a value it selects was
    cut at storage (over the app session's `max_payload_bytes`), and a score of what is
    left — or of the truncation marker — would be a wrong score. None: nothing it selects
    was cut (or the selection fails, which evaluating it reports). Values the serializer
    could not store as they were (nested past 200 levels, an int past Python's digits
    for text, an object without a working repr) are cut too, whatever their size."""
    try:
        calls = feedback.calls_for(record)
    except Exception:
        return None
    for call in calls:
        for param, value in call.items():
            found = _cut_in(value, 0)
            if found is not None:
                cut, by_size = found
                label = feedback.selectors.get(param, param)
                advice = ("store larger values whole (the app's Session(max_payload_bytes"
                          "=...)) to evaluate them" if by_size else "evaluate it in the "
                          "app's own process (feedback_mode='with_app_thread') to see it whole")
                return (f"not evaluated: the value selected for {param!r} ({label}) was "
                        f"truncated when the record was stored ({cut}), so scoring it "
                        f"would score the cut value; {advice}")
    return None
