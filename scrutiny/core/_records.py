"""Records and their spans: what one root invocation of an application did.

A :class:`Record` is built by an integration from the framework's own events (one per root
run) and handed to :meth:`Session.ingest`. It carries the main input and output (already
reduced to plain values where the framework makes that obvious), the retrieved contexts, the
flat list of :class:`Span` objects that form the call tree, token usage and timing.

Spans are created on the application's thread, so they hold references only: nothing is
copied or serialized until the session's writer thread stores the record.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import decimal
import enum
import inspect
import itertools
import logging
import math
import numbers
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from scrutiny.core._errors import ConfigurationError, describe_error
from scrutiny.core._ids import new_uuid
from scrutiny.core._missing import is_missing
from scrutiny.core._results import FeedbackResult, FeedbackStatus, repr_cut
from scrutiny.core._runtime import shared_notifier, wait_limit
from scrutiny.core._serialize import TRUNCATED_KEY
from scrutiny.core._snapshot import snapshot

if TYPE_CHECKING:
    from scrutiny.core._feedback import Feedback

__all__ = ["Record", "RecordStatus", "Span", "SpanKind", "TokenUsage", "utc_from_timestamp"]

logger = logging.getLogger("scrutiny")

ResultsCallback = Callable[[dict["Feedback", FeedbackResult]], object]


def utc_from_timestamp(ts: float | None) -> datetime | None:
    """Turn an epoch timestamp into a timezone-aware UTC datetime (None stays None)."""
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


class RecordStatus(str, enum.Enum):
    """How the root invocation ended."""

    OK = "ok"
    ERROR = "error"
    CANCELLED = "cancelled"  # a stream the consumer stopped early, a cancelled task

    def __str__(self) -> str:  # (as FeedbackStatus: "ok", not "RecordStatus.OK")
        return self.value


class SpanKind(str, enum.Enum):
    """What a span stands for; integrations map their framework's run types onto these."""

    CHAIN = "chain"
    LLM = "llm"
    CHAT_MODEL = "chat_model"
    RETRIEVER = "retriever"
    TOOL = "tool"
    EMBEDDING = "embedding"
    PARSER = "parser"
    PROMPT = "prompt"
    QUERY = "query"
    SYNTHESIZE = "synthesize"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


@dataclass(slots=True)
class TokenUsage:
    """Token counts as the model reported them; a count the model did not send stays None."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None

    @staticmethod
    def total(usages: Sequence[TokenUsage | None]) -> TokenUsage | None:
        """Add up several usages; None when none of them reported anything.

        The total is the sum of each usage's total, which is its prompt + completion
        when it sent none; when one usage has neither, the total is unknown (None). (The
        totals present were summed alone: 15 for (10, 5, 15) and (20, 2, None).)"""
        reported = [u for u in usages if u is not None]
        if not reported:
            return None

        def add(values: list[int | None]) -> int | None:
            present = [v for v in values if v is not None]
            return sum(present) if present else None

        prompt = add([u.prompt_tokens for u in reported])
        completion = add([u.completion_tokens for u in reported])
        totals = [u._whole() for u in reported if u != _NOTHING]
        total = None if not totals or None in totals else sum(
            t for t in totals if t is not None)
        return TokenUsage(prompt, completion, total)

    def _whole(self) -> int | None:
        """Its total as sent, else prompt + completion when both are known."""
        if self.total_tokens is not None:
            return self.total_tokens
        if self.prompt_tokens is None or self.completion_tokens is None:
            return None
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int | None]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


_NOTHING = TokenUsage()
"""A usage that reported no count: it adds nothing to a sum, not an unknown total."""


@dataclass(slots=True, eq=False)
class Span:
    """One step of the call tree: a chain, a model call, a retrieval, a tool call, ..."""

    span_id: str
    parent_id: str | None
    name: str
    kind: str
    start_time: float
    end_time: float | None = None
    inputs: Any = None
    outputs: Any = None
    error: str | None = None
    usage: TokenUsage | None = None
    model: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def latency(self) -> float | None:
        """Seconds between start and end (0 for an end before the start: the clock was set
        back meanwhile), or None while the span is open."""
        return None if self.end_time is None else max(0.0, self.end_time - self.start_time)


_FROM_A_DICT = {"tags": "key/value pairs belong in metadata={...}",
                "contexts": "pass its texts, e.g. contexts=list(texts_by_id.values())"}


def _listed(value: Any, name: str, example: str) -> Any:
    """A field that must be a list: another iterable becomes one; a string is refused.
    A truncation marker read back from storage (a list cut at `max_payload_bytes`, stored
    as ``{"__scrutiny_truncated__": true, ...}``) stays as it is: as the list of its keys
    it no longer said it was cut, and feedbacks scored those keys."""
    if isinstance(value, Mapping) and value.get(TRUNCATED_KEY) is True:
        return value
    if isinstance(value, Mapping):  # (its keys alone were kept, its values silently lost)
        raise TypeError(f"Record.{name} is a list ({example}); got a dict "
                        f"{str(value)[:60]!r}: {_FROM_A_DICT[name]}")
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise TypeError(f"Record.{name} is a list ({example}); got "
                        f"{type(value).__name__} {str(value)[:60]!r}")
    return list(value)


def _seconds(value: Any, name: str) -> float:
    """A time as seconds since the epoch (a datetime is converted; naive ones are local)."""
    if is_missing(value):  # (pandas' NaT is a datetime, whose timestamp() raised "year 0")
        raise ValueError(f"Record.{name} is missing ({value!r}): give seconds since the "
                         f"epoch (time.time()) or a datetime, or leave {name} out (the time "
                         "the record is made)")
    if isinstance(value, datetime):
        # (datetime's own method: pandas' Timestamp overrides it and takes a naive time as
        # UTC, so a time column read from a CSV was shifted by the machine's UTC offset)
        return datetime.timestamp(value)
    # (numbers.Real: numpy's int64 and float32, a pandas column's values; a Decimal from
    # a database driver. All were stored before, and refusing them lost the record.)
    if isinstance(value, bool) or not isinstance(value, numbers.Real | decimal.Decimal):
        raise TypeError(f"Record.{name} is seconds since the epoch (time.time()) or a "
                        f"datetime; got {type(value).__name__} {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds):  # (stored, it broke every table and chart of its app)
        raise ValueError(f"Record.{name} is seconds since the epoch (time.time()) or a "
                         f"datetime; got {value!r}")
    if not _EARLIEST <= seconds <= _LATEST:  # (past year 9999: the record failed to store)
        hint = ("; in milliseconds? divide by 1000" if _LATEST < seconds < _LATEST * 1000
                else "")
        raise ValueError(f"Record.{name} is seconds since the epoch (time.time()) or a "
                         f"datetime, between the years 1 and 9999; got {value!r}{hint}")
    return seconds


_EARLIEST = datetime(1, 1, 2, tzinfo=timezone.utc).timestamp()
_LATEST = datetime(9999, 12, 30, tzinfo=timezone.utc).timestamp()


def _text(value: Any, name: str, example: str) -> str:
    """A name or id field: a non-empty string (a number is taken as its text). Anything
    else — None from an unset environment variable, say — failed when the record was
    stored, and the record was lost."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):  # (app_version=1.10 was stored as "1.1")
        raise TypeError(f"Record.{name} is a non-empty string ({example}); got the float "
                        f"{value!r}, which loses digits (1.10 is 1.1): give its text")
    raise TypeError(f"Record.{name} is a non-empty string ({example}); got {value!r}")


_STATUS_UNSET: Any = object()

MAX_RECORD_ID_BYTES = 512
"""The most UTF-8 bytes of a record id: it is a primary key and in an index of every result
of the record, and PostgreSQL refuses index rows over 2,704 bytes (the record was lost
there, while SQLite stored it)."""


def _check_id(record_id: str) -> None:
    try:
        size = len(record_id.encode("utf-8"))
    except UnicodeEncodeError:  # (a lone surrogate: a file name decoded with surrogateescape)
        raise ValueError(
            f"Record.record_id {record_id!r} holds a character UTF-8 cannot encode (a lone "
            "surrogate); give an id of plain text, e.g. "
            "name.encode('utf-8', 'surrogateescape').hex() or a uuid") from None
    if size > MAX_RECORD_ID_BYTES:
        raise ValueError(
            f"Record.record_id is {size} bytes (UTF-8); at most {MAX_RECORD_ID_BYTES}: use "
            "a short unique id (a uuid, a hash of the long one) and put the long text in "
            "metadata={...}")


def _error_text(value: Any) -> str | None:
    """Record.error as text: an exception (``error=exc``) as its type and message; an
    empty cell of a table (NaN, pandas' NA) as None."""
    if isinstance(value, BaseException):
        return describe_error(value)
    if (isinstance(value, float) and math.isnan(value)) or type(value).__name__ == "NAType":
        return None
    raise TypeError(f"Record.error is the reason the call failed, as text (or the "
                    f"exception itself); got {type(value).__name__} {value!r}")


_USAGE_KEYS = {"prompt_tokens": "prompt_tokens", "completion_tokens": "completion_tokens",
               "total_tokens": "total_tokens", "input_tokens": "prompt_tokens",
               "output_tokens": "completion_tokens"}
"""The keys of a usage dict, as providers and LangChain's usage_metadata name them."""


def _usage(value: Any) -> TokenUsage:
    """Record.usage as a TokenUsage: a provider's dict (OpenAI's, LangChain's
    usage_metadata) is read by its token counts; anything else is refused."""
    if not isinstance(value, Mapping):
        raise TypeError(f"Record.usage is a TokenUsage(prompt_tokens=, completion_tokens=, "
                        f"total_tokens=) or a dict of those counts; got "
                        f"{type(value).__name__} {value!r}")
    counts: dict[str, int | None] = {}
    for key, count in value.items():
        field_name = _USAGE_KEYS.get(key)
        if field_name is None:  # (details a provider adds: cached tokens, reasoning, ...)
            continue
        if count is not None:
            whole = isinstance(count, numbers.Integral) or (
                isinstance(count, float) and count.is_integer())
            if isinstance(count, bool) or not whole or count < 0:
                raise ValueError(f"Record.usage[{key!r}] is a count of tokens (a whole "
                                 f"number >= 0) or None; got {count!r}")
            count = int(count)
        counts.setdefault(field_name, count)
    return TokenUsage(**counts)


def _spans(spans: Any) -> list[Span]:
    """Record.spans as Span objects: a dict of Span's fields (a span read from a log) is
    made one; anything else is refused, saying which item."""
    if isinstance(spans, str | bytes | Mapping) or not isinstance(spans, Iterable):
        raise TypeError(f"Record.spans is a list of Span objects; got "
                        f"{type(spans).__name__}")
    fields = set(Span.__dataclass_fields__)
    out = []
    for i, span in enumerate(spans):
        if isinstance(span, Span):
            out.append(span)
            continue
        if isinstance(span, Mapping) and set(span) <= fields:
            given = dict(span)
            if given.get("usage") is not None and type(given["usage"]) is not TokenUsage:
                given["usage"] = _usage(given["usage"])
            if isinstance(given.get("error"), BaseException):
                given["error"] = describe_error(given["error"])
            try:
                out.append(Span(**given))
                continue
            except TypeError as exc:  # (a required field left out)
                raise TypeError(f"Record.spans[{i}]: {exc}") from None
        raise TypeError(f"Record.spans[{i}] is a Span (or a dict of its fields: "
                        f"{sorted(fields)}); got {type(span).__name__} {span!r:.200}")
    return out


@dataclass(eq=False)
class Record:
    """One root invocation of an application, with its span tree and feedback results."""

    app_name: str
    app_version: str
    input: Any = None
    output: Any = None
    record_id: str = field(default_factory=new_uuid)
    status: RecordStatus = _STATUS_UNSET
    """(Not given: `error` when an `error` is given, else `ok`.)"""
    error: str | None = None
    start_time: float = field(default_factory=time.time)
    end_time: float = math.nan
    """(Not given: the start time.)"""
    spans: list[Span] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)
    usage: TokenUsage | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    framework: str | None = None
    root_run_id: str | None = None
    # (not arguments: dataclasses.replace(record, ...) made a variant that shared the
    # original's results, and giving it to a session was refused as already scored)
    _slots: dict[Feedback, _ResultSlot] = field(default_factory=dict, repr=False,
                                                init=False)
    _pending_init: Callable[[], object] | None = field(default=None, repr=False, init=False)
    _watch: Any = field(default=None, repr=False, init=False)
    """For a record read back from storage: reads its unfinished results again while
    someone waits on them (see _reading._StoredWatch)."""

    if TYPE_CHECKING:  # (the forms __post_init__ takes, for type checkers: the fields'
        # own types refused an exception as error=, a dict of token counts, datetimes and
        # spans given as dicts, as the README shows them)
        def __init__(
            self,
            app_name: str | int,
            app_version: str | int,
            input: Any = None,
            output: Any = None,
            record_id: str | int = ...,
            status: RecordStatus | str = ...,
            error: str | BaseException | None = None,
            start_time: float | datetime = ...,
            end_time: float | datetime = ...,
            spans: Iterable[Span | Mapping[str, Any]] | None = ...,
            contexts: Iterable[str] | None = ...,
            usage: TokenUsage | Mapping[str, Any] | None = None,
            tags: Iterable[str] | None = ...,
            metadata: Mapping[str, Any] | None = ...,
            framework: str | None = None,
            root_run_id: str | None = None,
        ) -> None: ...

    def __post_init__(self) -> None:
        # A record built by hand is stored on the writer thread, long after this call: a
        # field of the wrong shape failed there (the record lost, its results failed), so
        # it is made right — or refused, saying how — here.
        self.app_name = _text(self.app_name, "app_name", 'e.g. "qa"')
        self.app_version = _text(self.app_version, "app_version", 'e.g. "v1"')
        if len(self.app_name) + len(self.app_version) > MAX_APP_LABEL_BYTES // 4:
            check_app_label(self.app_name, self.app_version)
        self.record_id = _text(self.record_id, "record_id", "ids are unique strings")
        if not self.record_id.isascii() or len(self.record_id) > MAX_RECORD_ID_BYTES:
            _check_id(self.record_id)
        # (a table's missing cell, NaN or pandas' NA, is no value, as None is)
        for name in ("error", "usage", "contexts", "tags", "metadata", "spans"):
            if is_missing(getattr(self, name)):
                setattr(self, name, None)
        if self.error is not None and type(self.error) is not str:
            # (a str of another type — numpy's, a str Enum — as its text)
            self.error = str(self.error) if isinstance(self.error, str) else \
                _error_text(self.error)
        if self.usage is not None and type(self.usage) is not TokenUsage:
            self.usage = _usage(self.usage)
            if self.usage.total_tokens is None:  # (Anthropic's counts, LangChain's
                # usage_metadata: summed as the recorders sum a model's; the leaderboard's
                # and dashboard's tokens showed nothing)
                self.usage.total_tokens = self.usage._whole()
        if self.contexts is None:
            self.contexts = []
        elif isinstance(self.contexts, str | bytes) or not isinstance(self.contexts, Sequence):
            self.contexts = _listed(self.contexts, "contexts",
                                    "the retrieved texts, e.g. contexts=[text]")
        if self.tags is None:
            self.tags = []
        elif isinstance(self.tags, str | bytes) or not isinstance(self.tags, Sequence):
            self.tags = _listed(self.tags, "tags", 'e.g. tags=["prod"]')
        if self.metadata is None:
            self.metadata = {}
        elif not isinstance(self.metadata, Mapping):
            raise TypeError(f"Record.metadata is a dict; got {type(self.metadata).__name__}")
        if self.spans is None:
            self.spans = []
        elif type(self.spans) is not list or any(type(span) is not Span
                                                  for span in self.spans):
            self.spans = _spans(self.spans)  # (a generator of spans is read once, here)
        if self.status is _STATUS_UNSET:  # (error=exc alone was stored as a call that was ok)
            self.status = RecordStatus.OK if self.error is None else RecordStatus.ERROR
        elif not isinstance(self.status, RecordStatus):
            try:
                self.status = RecordStatus(self.status)
            except ValueError:
                raise ValueError(
                    f"Record.status is one of {[s.value for s in RecordStatus]}; got "
                    f"{self.status!r}") from None
        # A record made by hand without its times (a dataset's answers, scored after the
        # fact) was dated 1970: last in every list, alone at the far left of every chart.
        self.start_time = _seconds(self.start_time, "start_time")
        end = self.end_time
        self.end_time = self.start_time if isinstance(end, float) and math.isnan(end) \
            else _seconds(end, "end_time")

    # ------------------------------------------------------------------ copies
    # A record holds its results' locks and futures: copy.deepcopy and pickle failed on
    # them ("cannot pickle '_thread.RLock' object"), and copy.copy shared them.
    def __getstate__(self) -> dict[str, Any]:
        """(copy, deepcopy, pickle) Its values, and its results as they are now: a copy is
        a snapshot of the record, not tied to what evaluates the original (a result still
        pending in it stays pending)."""
        state = dict(self.__dict__)
        state["_slots"] = [(fb, slot.current, slot.elsewhere)
                           for fb, slot in self._result_slots().items()]
        state["_pending_init"] = state["_watch"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        given = state.pop("_slots")
        self.__dict__.update(state)
        self._slots = {}
        for fb, current, elsewhere in given:
            slot = self._slots[fb] = _ResultSlot(current)
            slot.elsewhere = elsewhere
            slot._done = current.status.is_final

    def __deepcopy__(self, memo: dict[int, Any]) -> Record:
        """Its values copied; its feedbacks shared (a judge's client and limiter are not
        the record's to copy), as in `feedback_results`."""
        state = self.__getstate__()
        for fb, _, _ in state["_slots"]:
            memo[id(fb)] = fb
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(state, memo))
        return copied

    def _hold_values(self) -> None:
        """(Given to a session.) Keep its values as they are now: its dicts and lists (and
        its spans') copied, see `snapshot`. It is stored and judged later, and a dataset
        loop that refilled one dict or list per row stored every record with the last
        row's values."""
        self.input = snapshot(self.input)
        self.output = snapshot(self.output)
        self.contexts = snapshot(self.contexts)
        self.tags = snapshot(self.tags)
        self.metadata = snapshot(self.metadata)
        if self.spans:
            self.spans = [_held_span(span) for span in self.spans]

    def __repr__(self) -> str:
        # (short: the generated one held every span's inputs and outputs — 140 KB for a
        # record with 19 KB of contexts — in a notebook's output, an assertion's diff)
        shown = [f"{self.record_id!r}", f"app={self.app_id!r}",
                 f"status={self.status.value!r}"]
        for name in ("input", "output"):
            value = getattr(self, name)
            text = value if isinstance(value, str) else repr(value)
            shown.append(f"{name}={repr_cut(text, 80)!r}" if isinstance(value, str)
                         else f"{name}={repr_cut(text, 80)}")
        if self.error:
            shown.append(f"error={repr_cut(self.error, 80)!r}")
        if self.contexts:
            shown.append(f"contexts={len(self.contexts)}")
        if self.spans:
            shown.append(f"spans={len(self.spans)}")
        try:
            slots = dict(self._slots)
        except RuntimeError:  # (made on another thread this very moment)
            slots = {}
        if slots:
            shown.append("results={" + ", ".join(
                f"{fb.name!r}: {_result_text(slot.current)}" for fb, slot in slots.items())
                + "}")
        return f"Record({', '.join(shown)})"

    def _result_slots(self) -> dict[Feedback, _ResultSlot]:
        """The result slots, made first if the session has not made them yet."""
        init = self._pending_init
        if init is not None:
            init()
        return self._slots

    # ----------------------------------------------------------------- derived values
    @property
    def app_id(self) -> str:
        """The id of the (name, version) pair this record belongs to."""
        return app_id_for(self.app_name, self.app_version)

    @property
    def latency(self) -> float:
        """Seconds from the start of the root run to its end."""
        return max(0.0, self.end_time - self.start_time)

    @property
    def start_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.start_time, tz=timezone.utc)

    @property
    def end_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.end_time, tz=timezone.utc)

    def root_span(self) -> Span | None:
        """The span of the root run (the first one without a parent)."""
        return next((s for s in self.spans if s.parent_id is None), None)

    def children(self, span: Span) -> list[Span]:
        """The spans whose parent is `span`, in start order."""
        return [s for s in self.spans if s.parent_id == span.span_id]

    def walk(self) -> Iterator[tuple[int, Span]]:
        """Every span once, with its depth, depth first, children in start order. Spans
        whose parents form a cycle (a record built by hand) come last, at the top level:
        with two spans of one id, one the other's child, this walk never ended."""
        by_parent: dict[str | None, list[Span]] = {}
        known = {s.span_id for s in self.spans}
        ordered = sorted(self.spans, key=lambda s: s.start_time)
        for s in ordered:
            parent = s.parent_id if s.parent_id in known else None
            by_parent.setdefault(parent, []).append(s)
        seen: set[int] = set()  # (by identity: ids may repeat)
        for top in itertools.chain([by_parent.get(None, [])], ([s] for s in ordered)):
            stack: list[tuple[int, Span]] = [(0, s) for s in reversed(top)]
            while stack:
                depth, span = stack.pop()
                if id(span) in seen:
                    continue
                seen.add(id(span))
                yield depth, span
                stack.extend((depth + 1, c) for c in reversed(by_parent.get(span.span_id, []))
                             if id(c) not in seen)
            if len(seen) == len(self.spans):
                return

    def spans_of_kind(self, *kinds: str) -> list[Span]:
        wanted = {str(getattr(k, "value", k)) for k in kinds}
        return [s for s in self.spans if str(s.kind) in wanted]

    # ----------------------------------------------------------------- feedback results
    @property
    def feedback_results(self) -> FeedbackResults:
        """The latest known result of each feedback (pending ones included)."""
        return FeedbackResults((fb, slot.current) for fb, slot in self._result_slots().items())

    def feedback_futures(self) -> dict[Feedback, concurrent.futures.Future[FeedbackResult]]:
        """One future per feedback; each resolves after its result is stored."""
        return {fb: slot.future for fb, slot in self._result_slots().items()}

    def wait_for_feedback_results(
        self,
        timeout: float | None = None,
        *,
        callback: ResultsCallback | None = None,
    ) -> FeedbackResults:
        """Wait for every feedback result of this record.

        Args:
            timeout: the most seconds to block; None waits until all are stored.
            callback: when given, return at once (`timeout` does not apply);
                `callback(results)` runs exactly once, on a Scrutiny thread, after every
                result is stored. It may be an ``async def`` (run to its end on that
                thread). Keep it short: the session's callbacks, listeners and feedback
                events run in turn on that thread (hand long work to a thread of your own).
                Its exceptions are logged.

        On a thread that runs an event loop this blocks the loop: there, use
        ``await record.await_feedback_results(timeout)``.

        Returns:
            `{feedback: result}`. Every returned result that is `done`, `failed` or
            `skipped` is already in the database. Results still pending or running when the
            timeout runs out are returned with that status (and a warning is logged); they
            are never dropped or turned into a score.
        """
        watch = self._watch
        timeout = wait_limit(timeout)
        if callback is not None:
            if not callable(callback):  # (it failed later, on the callback thread)
                raise TypeError(f"callback is called with the results: give a function, "
                                f"got {callback!r}")
            self._add_completion_callback(callback)
            if watch is not None:
                watch.follow_in_background()
            return self.feedback_results
        if watch is not None:  # (it waits itself: no second wait as long again after it)
            watch.follow(None if timeout is None else time.monotonic() + timeout)
            timeout = 0
        slots = list(self._result_slots().values())
        futures = [slot.future for slot in slots]
        if timeout is None:  # (a wait on results nothing here evaluates blocked for ever,
            # without a word: say so once it has waited a while, then wait on)
            _, not_done = concurrent.futures.wait(futures, timeout=WAIT_HINT_AFTER)
            if not_done and _none_started(slots):
                logger.warning(
                    "wait_for_feedback_results: still waiting for %d result(s) of record %s "
                    "after %gs, none of them started%s", len(not_done), self.record_id,
                    WAIT_HINT_AFTER, _NOT_STARTED_HINT)
            futures = list(not_done)
        _, not_done = concurrent.futures.wait(futures, timeout=timeout)
        if not_done:
            logger.warning(
                "wait_for_feedback_results: %d of %d feedback results of record %s were not "
                "finished after %ss; they are returned with their current status%s%s",
                len(not_done), len(futures), self.record_id, timeout,
                _NOT_STARTED_HINT if _none_started(slots) else
                " and will still be stored when they finish", _on_a_loop_hint(timeout),
            )
        return self.feedback_results

    async def await_feedback_results(
        self, timeout: float | None = None
    ) -> FeedbackResults:
        """The async form of :meth:`wait_for_feedback_results`: never blocks the event loop."""
        timeout = wait_limit(timeout)
        watch = self._watch
        if watch is not None:
            stop = threading.Event()
            try:  # (on a thread: it reads the database)
                await on_a_thread_of_its_own(
                    watch.follow, None if timeout is None else time.monotonic() + timeout,
                    stop)
            finally:
                stop.set()  # (an await cancelled by its caller stops reading)
            timeout = 0  # (it waited itself)
        futures = [asyncio.wrap_future(slot.future)
                   for slot in self._result_slots().values()]
        if futures:
            _, not_done = await asyncio.wait(futures, timeout=timeout)
            for f in not_done:  # stop the wrappers; the evaluation itself goes on
                f.cancel()
        return self.feedback_results

    def _add_completion_callback(self, callback: ResultsCallback) -> None:
        slots = list(self._result_slots().values())
        state = _CallbackState(callback, len(slots), self)
        stored = sum(not slot.on_done(state.one_done) for slot in slots)
        if state.count(stored):  # all stored already (or none to wait for): fire it on a
            shared_notifier().call(state.fire)  # thread of ours, not the caller's


WAIT_HINT_AFTER = 10.0
"""Seconds a wait without a timeout waits before it says why nothing has started."""
_NOT_STARTED_HINT = (
    ": nothing in this process evaluates them — in feedback_mode='deferred' a worker does "
    "(`scrutiny worker`, session.start_worker()) or session.resume_pending(), and results "
    "left pending over max_backlog wait for resume_pending() too")


def _none_started(slots: Sequence[_ResultSlot]) -> bool:
    """Whether every unfinished result is still `pending` and left to others (workers,
    resume_pending): none will start in this process by itself."""
    unfinished = [slot for slot in slots if not slot.current.is_final]
    return bool(unfinished) and all(
        slot.elsewhere and slot.current.status is FeedbackStatus.PENDING
        for slot in unfinished)


def _on_a_loop_hint(timeout: float | None) -> str:
    """What to say to a blocking wait that ran out on a thread running an event loop."""
    if not timeout:
        return ""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return ""
    return (f" (this wait blocked the event loop running on this thread for {timeout}s: "
            f"in async code use `await record.await_feedback_results(timeout=...)`)")


T = TypeVar("T")


async def on_a_thread_of_its_own(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on a daemon thread of its own; wait for its end without blocking
    the event loop, and return what it returned (or re-raise what it raised).

    Not ``asyncio.to_thread``: the loop's default executor has few threads (cpus + 4),
    shared with the application's own calls (a sync-only model's ``ainvoke``,
    ``to_thread``), and each wait on a stored record held one until its results ended:
    six waits without a timeout on a two-core machine stalled the app's calls for good.
    """
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, error: Exception | None) -> None:
        if ended.done():  # (its waiter was cancelled)
            return
        if error is None:
            ended.set_result(value)
        else:
            ended.set_exception(error)

    def run() -> None:
        value: Any = None
        error: Exception | None = None
        try:
            value = fn(*args)
        except Exception as exc:
            error = exc
        finally:
            try:
                loop.call_soon_threadsafe(settle, value, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    threading.Thread(target=run, daemon=True, name="scrutiny-wait").start()
    return await ended


MAX_APP_LABEL_BYTES = 800
"""The most UTF-8 bytes of an app's name and version together. They name the app version in
every record row, and with its id (about as long again) in PostgreSQL's indexes, whose rows
hold at most 2,704 bytes: a version of some kilobytes (a prompt template) lost every record
of the app there, while SQLite kept them."""


def check_app_label(app_name: str, app_version: str) -> None:
    """Refuse an app name and version too long to be stored everywhere (ConfigurationError,
    saying what to do)."""
    name_size = len(app_name.encode("utf-8", "surrogatepass"))
    version_size = len(app_version.encode("utf-8", "surrogatepass"))
    size = name_size + version_size
    if size > MAX_APP_LABEL_BYTES:
        longer = ("app_name", "the name a short label (\"support-bot\")") \
            if name_size >= version_size else \
            ("app_version", "the version a short label (\"v2\", a git sha, a hash of a prompt)")
        raise ConfigurationError(
            f"app_name and app_version are {size} bytes together (UTF-8; {longer[0]}: "
            f"{max(name_size, version_size)}); at most {MAX_APP_LABEL_BYTES}: they label "
            f"every record and index entry of the app. Keep {longer[1]} and put a long "
            f"description in metadata={{...}}")


def app_id_for(app_name: str, app_version: str) -> str:
    """A stable, readable id for an app version, one per (name, version) pair.

    ``"name:version"`` when neither part holds ``":"`` or ``"\\"`` (the ids every database
    has always had); otherwise each part has ``"\\"`` written as ``"\\\\"`` and ``":"`` as
    ``"\\:"`` before they are joined, so app ``"team"`` version ``"qa:v1"`` (``team:qa\\:v1``)
    and app ``"team:qa"`` version ``"v1"`` (``team\\:qa:v1``) stay two apps. A part that
    cannot be stored as UTF-8 (a lone surrogate) is taken as it is stored (a backslash
    escape), so the id is the same whether computed from the app or from its stored row.
    Migration 0004 gives stored rows these ids; it repeats this rule in SQL.
    """
    if (app_name.isascii() and app_version.isascii() and ":" not in app_name
            and "\\" not in app_name and ":" not in app_version and "\\" not in app_version):
        return f"{app_name}:{app_version}"  # (the common case, on every record's rows)
    parts = []
    for part in (app_name, app_version):
        if not part.isascii():
            try:
                part.encode("utf-8")
            except UnicodeEncodeError:
                part = part.encode("utf-8", "backslashreplace").decode("utf-8")
        if ":" in part or "\\" in part:
            part = part.replace("\\", "\\\\").replace(":", "\\:")
        parts.append(part)
    return f"{parts[0]}:{parts[1]}"


class _CallbackState:
    """Counts finished results and fires the user's callback once, outside any lock."""

    __slots__ = ("_callback", "_lock", "_record", "_remaining")

    def __init__(self, callback: ResultsCallback, remaining: int, record: Record) -> None:
        self._callback = callback
        self._remaining = remaining
        self._lock = threading.Lock()
        self._record = record

    def count(self, finished: int) -> bool:
        """`finished` more results are stored; True once, for the count that ends it."""
        with self._lock:
            if self._remaining < 0:  # (fired already)
                return False
            self._remaining -= finished
            if self._remaining > 0:
                return False
            self._remaining = -1
            return True

    def one_done(self) -> None:
        """(A result's listener, run on the session's callback thread.)"""
        if self.count(1):
            self.fire()

    def fire(self) -> None:
        """(On a callback thread of Scrutiny's: no event loop runs here.)"""
        callback = self._callback
        try:
            outcome = callback(self._record.feedback_results)
            if inspect.isawaitable(outcome):  # an async callback: run to its end
                asyncio.run(_awaited(outcome))
        except Exception:
            logger.exception("feedback results callback %r raised", callback)


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class FeedbackResults(dict["Feedback", FeedbackResult]):
    """A record's results by feedback: ``results[feedback]``, or ``results["name"]`` by the
    feedback's name (a test asserting on a score need not keep the Feedback object)."""

    def __missing__(self, key: object) -> FeedbackResult:
        if isinstance(key, str):
            for feedback, result in self.items():
                if feedback.name == key:
                    return result
            raise KeyError(f"{key!r}: no result of a feedback of that name; the record has "
                           f"{sorted(f.name for f in self)}")
        # A record read back from the database holds stand-ins of its feedbacks: the
        # Feedback the app wired finds its own result by its definition's id.
        wanted = getattr(key, "feedback_id", None)
        if isinstance(wanted, str):
            for feedback, result in self.items():
                if getattr(feedback, "feedback_id", None) == wanted:
                    return result
            name = getattr(key, "name", None)
            if any(f.name == name for f in self):
                raise KeyError(f"{key!r}: the record's result named {name!r} is of another "
                               f"definition of it (other wiring or function); "
                               f"results[{name!r}] gives it")
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:  # ("length" in results, as results[...])
        if dict.__contains__(self, key):
            return True
        try:
            self.__missing__(key)
        except KeyError:
            return False
        return True

    def get(self, key: Feedback | str, default: Any = None, /) -> Any:
        """``results.get("name")`` finds a result by name too, as ``results["name"]``."""
        try:
            return self[key]
        except KeyError:
            return default

    if TYPE_CHECKING:
        def __getitem__(self, key: Feedback | str, /) -> FeedbackResult: ...


class LazyRecord:
    """A record whose :class:`Record` is built on first use: by the session's writer thread
    when it stores it, or by whoever asks first (``get()``). An integration hands one over
    at the end of a root run, so the application's thread pays only for queueing the raw
    material, not for assembling the record. The id is fixed at once."""

    __slots__ = ("_build", "_lock", "_on_build", "_record", "record_id")

    def __init__(self, build: Callable[[str], Record]) -> None:
        self.record_id = new_uuid()
        self._build: Callable[[str], Record] | None = build
        self._on_build: Callable[[Record], None] | None = None
        self._record: Record | None = None
        self._lock = threading.Lock()

    def get(self) -> Record:
        """The record (built once, whichever thread asks first)."""
        record = self._record
        if record is not None:
            return record
        with self._lock:
            if self._record is None:
                assert self._build is not None
                record = self._build(self.record_id)
                if self._on_build is not None:
                    self._on_build(record)
                self._record = record
                self._build = self._on_build = None  # free what the builder held
            return self._record

    def on_build(self, fn: Callable[[Record], None]) -> None:
        """Call `fn(record)` when the record is built (at once if it is built already)."""
        with self._lock:
            if self._record is None:
                self._on_build = fn
                return
        fn(self._record)


def _result_text(result: FeedbackResult) -> str:
    """'done 0.42', 'failed', 'pending': a result in a record's repr."""
    score = result.result
    return result.status.value if score is None else f"{result.status.value} {score:.3g}"


def _held_span(span: Span) -> Span:
    """A copy of `span` with its own dicts and lists (see Record._hold_values)."""
    held = copy.copy(span)
    held.inputs = snapshot(span.inputs)
    held.outputs = snapshot(span.outputs)
    held.tags = snapshot(span.tags)
    held.metadata = snapshot(span.metadata)
    return held


def materialized(record: Record | LazyRecord) -> Record:
    """The :class:`Record` itself (a lazy one is built now)."""
    return record.get() if isinstance(record, LazyRecord) else record


class _ResultFuture(concurrent.futures.Future[FeedbackResult]):
    """The future of one result. Its done-callbacks run on the session's callback thread,
    in turn with the other callbacks, not on the writer thread that resolves it: there a
    slow one stalled the storing of every record and result, and one that waited for
    another result waited for the writer it held (until its timeout). The future itself
    is resolved at once (`result()`, `wait()` see it as soon as the result is stored);
    asyncio's wrapper (``asyncio.wrap_future``, ``await_feedback_results``) only hands the
    result to its loop, and is told at once too."""

    def __init__(self) -> None:
        super().__init__()
        self._held: list[Callable[[concurrent.futures.Future[FeedbackResult]], object]] = []

    def add_done_callback(
            self, fn: Callable[[concurrent.futures.Future[FeedbackResult]], object]) -> None:
        if getattr(fn, "__module__", None) == "asyncio.futures":  # (a loop's wrapper)
            super().add_done_callback(fn)
            return
        with self._condition:
            if not self.done():
                self._held.append(fn)
                return
        try:  # (resolved already: run now, on the caller's thread, as Future does)
            fn(self)
        except Exception:
            logger.exception("scrutiny: done-callback %s of a feedback future raised",
                             _callable_name(fn))

    def take_held(self) -> _DoneCallbacks | None:
        """(Once resolved.) Its done-callbacks, for the callback thread to run."""
        with self._condition:
            held, self._held = self._held, []
        return _DoneCallbacks(self, held) if held else None


class _DoneCallbacks:
    """The done-callbacks of a resolved feedback future, run on the callback thread."""

    __slots__ = ("_callbacks", "_future")

    def __init__(self, future: _ResultFuture,
                 callbacks: list[Callable[[concurrent.futures.Future[FeedbackResult]],
                                          object]]) -> None:
        self._future = future
        self._callbacks = callbacks

    @property
    def __scrutiny_name__(self) -> str:  # (what a slow-callback warning names)
        return ", ".join(_callable_name(fn) for fn in self._callbacks)

    def __call__(self) -> None:
        for fn in self._callbacks:
            try:
                fn(self._future)
            except Exception:
                logger.exception("scrutiny: done-callback %s of a feedback future raised",
                                 _callable_name(fn))


def _callable_name(fn: object) -> str:
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else type(fn).__qualname__


class _ResultSlot:
    """The current state of one (record, feedback) result and the future of its end.

    The future is made only when someone asks for it: most results are never awaited one
    by one, and the application's thread should not pay for a future per feedback.
    """

    __slots__ = ("_done", "_future", "_listeners", "_lock", "current", "elsewhere")

    def __init__(self, initial: FeedbackResult) -> None:
        self.current = initial
        self.elsewhere = False
        """Evaluated by no one in this process: deferred to workers, or left pending over
        the backlog (see wait_for_feedback_results)."""
        self._future: _ResultFuture | None = None
        self._listeners: list[Callable[[], object]] | None = None
        self._lock = threading.Lock()
        self._done = False

    @property
    def future(self) -> concurrent.futures.Future[FeedbackResult]:
        """Shared by every waiter, so no one of them may cancel it: it is made *running*,
        which `cancel()` refuses (a timed-out ``asyncio.wait`` cancels its wrappers, and a
        cancelled shared future broke every later wait, callback and listener)."""
        with self._lock:
            if self._future is None:
                self._future = _ResultFuture()
                self._future.set_running_or_notify_cancel()
                if self._done:
                    self._future.set_result(self.current)
            return self._future

    def update(self, result: FeedbackResult) -> None:
        """A new state that has been stored (running, or an end state)."""
        if not self._done:  # an end state is final
            self.current = result

    def finish(self, result: FeedbackResult) -> list[Callable[[], object]]:
        """Resolve the future with a stored end state; returns the listeners to notify
        (on the callback thread), the future's done-callbacks first."""
        with self._lock:
            if self._done:
                return []
            self._done = True
            self.current = result
            listeners, self._listeners = self._listeners or [], None
            future = self._future
        if future is not None:
            future.set_result(result)
            done_callbacks = future.take_held()
            if done_callbacks is not None:
                listeners.insert(0, done_callbacks)
        return listeners

    def on_done(self, listener: Callable[[], object]) -> bool:
        """Have `listener()` called once the end state is stored; False (and no call) if it
        is stored already."""
        with self._lock:
            if self._done:
                return False
            if self._listeners is None:
                self._listeners = []
            self._listeners.append(listener)
            return True


def new_slot(record: Record, feedback: Feedback) -> _ResultSlot:
    """Create the pending result of `feedback` on `record` and attach it."""
    slot = _ResultSlot(
        FeedbackResult(
            record_id=record.record_id,
            feedback_name=feedback.name,
            status=FeedbackStatus.PENDING,
        )
    )
    record._slots[feedback] = slot
    return slot


def result_statuses(record: Record) -> Mapping[str, FeedbackStatus]:
    """Feedback name -> current status, for messages and tests."""
    return {fb.name: slot.current.status for fb, slot in record._result_slots().items()}
