"""Feedback definitions: a function, what it is wired to, and how it may be run.

A :class:`Feedback` is immutable in use: `.on(...)`, `.on_output()` and friends return a new
feedback, so one function can be wired several ways. Its identity (not its name) keys the
results of `Record.wait_for_feedback_results()`, so keep the objects you passed to the
recorder if you want to look results up by them.
"""

from __future__ import annotations

import copy
import decimal
import functools
import hashlib
import inspect
import itertools
import math
import numbers
import pickle
import re
import reprlib
import statistics
import threading
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scrutiny.core._errors import ConfigurationError, InvalidFeedbackValue
from scrutiny.core._refs import NotReferenceable, reference, resolve
from scrutiny.core._select import (
    EmptySelection,
    Select,
    Selector,
    as_selector,
    selector_from_spec,
)
from scrutiny.core._snapshot import snapshot

if TYPE_CHECKING:
    from scrutiny.core._records import Record

__all__ = ["Feedback", "RateLimit", "RetryPolicy", "coerce_feedback_value", "defined_here",
           "feedback_defaults", "remember_defined"]

_DEFINED_HERE: weakref.WeakValueDictionary[str, Feedback] = weakref.WeakValueDictionary()
_defined_lock = threading.Lock()


def remember_defined(feedbacks: Sequence[Feedback]) -> None:
    """Note feedbacks given to a session or a recorder in this process, by id (while they
    live): see `defined_here`."""
    with _defined_lock:
        for fb in feedbacks:
            _DEFINED_HERE[fb.feedback_id] = fb


def defined_here(feedback_id: str) -> Feedback | None:
    """The feedback of that id given to a session or recorder in this process, if one
    still lives. A feedback whose function is in ``__main__`` (a notebook's cell, a
    script) cannot be loaded by path: its results left pending (a session closed before
    they ran, a kernel restarted) failed for good when this process resumed them, with the
    very function defined here."""
    with _defined_lock:
        return _DEFINED_HERE.get(feedback_id)

Aggregator = Callable[[list[float]], float]


MAX_SECONDS = threading.TIMEOUT_MAX
"""The longest duration an option may give (about 292 years on 64-bit platforms): a
longer timeout failed every call run on an executor ("OverflowError: timestamp out of range
for platform time_t", from the thread's wait)."""


def _check_seconds(value: object, what: str, *, zero_ok: bool = False) -> None:
    """A duration option must be a finite number of seconds: NaN passed every `<= 0` test
    and, as a timer, broke the evaluation loop's timer heap (other feedbacks timed out)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
            value) or value < 0 or (value == 0 and not zero_ok) or float(value) > MAX_SECONDS:
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigurationError(f"{what} must be a finite number of seconds {bound} and "
                                 f"at most {MAX_SECONDS:.0f}, got {value!r} (None means no "
                                 f"limit where it is allowed)")


def _check_count(value: object, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigurationError(f"{what} must be a whole number >= {minimum}, got {value!r}")


def _check_policies(retry: object, rate_limit: object) -> None:
    """`retry` a RetryPolicy and `rate_limit` a RateLimit (or None): retry=3 or
    rate_limit=5 failed every evaluation as an "internal error"."""
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise ConfigurationError(
            f"retry must be a RetryPolicy, e.g. retry=RetryPolicy(attempts=3), got "
            f"{retry!r} (for a number of extra attempts use retries=n)")
    if rate_limit is not None and not isinstance(rate_limit, RateLimit):
        raise ConfigurationError(
            f"rate_limit must be a RateLimit, e.g. rate_limit=RateLimit(per_minute=60, "
            f"max_concurrent=4), got {rate_limit!r}")


def _exception_types(value: object, what: str) -> tuple[type[BaseException], ...]:
    """`retry_on` / `never_retry_on` as a tuple of exception classes. A single class
    (``retry_on=ValueError``) is taken as a tuple of one: it broke the stored definition,
    so the record was not stored at all; anything else that is not an exception class
    broke `isinstance` on the first failure ("internal error" instead of the failure)."""
    types = (value,) if isinstance(value, type) else value
    if not isinstance(types, tuple | list) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise ConfigurationError(
            f"{what} must be an exception class or a tuple of them, e.g. "
            f"(TimeoutError, ConnectionError), got {value!r}")
    return tuple(types)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a failing feedback call is tried again.

    Args:
        attempts: total attempts (1 means no retry).
        initial_backoff: seconds before the first retry; doubles each time, with jitter.
        max_backoff: the longest wait of the doubling backoff between attempts.
        max_retry_after: the longest retry-after hint from a server that is waited (it is
            waited even when longer than `max_backoff`); a longer one, or one that does
            not fit in what is left of the `deadline`, ends the result `failed` with the
            wait asked for (None: any hint that fits the deadline).
        retry_on: exception types that are worth another attempt.
        never_retry_on: exception types that are final even if they match `retry_on`
            (by default, values that are not a score: running again would not change them).
        deadline: the most seconds all attempts of a call may take together, waits between
            them included, counted from when the first one started (None: attempts times
            the timeout). Each attempt's timeout is cut to what is left of it.
    """

    attempts: int = 1
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    never_retry_on: tuple[type[BaseException], ...] = (InvalidFeedbackValue,)
    deadline: float | None = None
    max_retry_after: float | None = 300.0

    def __post_init__(self) -> None:
        _check_count(self.attempts, "RetryPolicy.attempts", 1)
        for field in ("retry_on", "never_retry_on"):  # (frozen: set through object)
            object.__setattr__(self, field, _exception_types(
                getattr(self, field), f"RetryPolicy.{field}"))
        _check_seconds(self.initial_backoff, "RetryPolicy.initial_backoff", zero_ok=True)
        _check_seconds(self.max_backoff, "RetryPolicy.max_backoff", zero_ok=True)
        if self.deadline is not None:
            _check_seconds(self.deadline, "RetryPolicy.deadline")
        if self.max_retry_after is not None:
            _check_seconds(self.max_retry_after, "RetryPolicy.max_retry_after", zero_ok=True)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A budget shared by every feedback with the same `group` (e.g. one judge's API key).

    Args:
        per_minute: the most calls started per minute, spaced evenly (None: no limit).
        max_concurrent: the most calls running at once (None: only the session's limit).
        group: feedbacks that name the same group share the budget.
    """

    per_minute: float | None = None
    max_concurrent: int | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if self.per_minute is not None and (
                isinstance(self.per_minute, bool)
                or not isinstance(self.per_minute, numbers.Real)
                or not math.isfinite(self.per_minute) or self.per_minute <= 0):
            raise ConfigurationError(f"RateLimit.per_minute must be a finite number > 0 (or "
                                     f"None for no limit), got {self.per_minute!r}")
        if self.max_concurrent is not None:
            _check_count(self.max_concurrent, "RateLimit.max_concurrent", 1)


MAX_NAME_BYTES = 512
"""The most UTF-8 bytes of a feedback's name: it labels every result and is in an index of
them with the app's id, and PostgreSQL refuses index rows over 2,704 bytes (every record
evaluated with a longer name was lost there, while SQLite stored it)."""


def _check_name_size(name: str) -> None:
    if len(name) * 4 <= MAX_NAME_BYTES:  # (no need to count)
        return
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise ConfigurationError(
            f"the feedback name {name[:60]!r}... is {size} bytes (UTF-8); at most "
            f"{MAX_NAME_BYTES}: it labels every result and column. Give a short name "
            f"(name='groundedness') and keep the long text in the function or its criterion")


def _check_flag(value: object, what: str) -> bool:
    """A yes/no option as a bool: a bool, numpy's bool or 0/1 (not a string: "no" is
    true)."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str | bytes) and _numeric(value) and value in (0, 1):
        return bool(value)
    raise ConfigurationError(f"{what} must be True or False, got {value!r}")


def _check_aggregate(fn: object) -> None:
    if not callable(fn):
        raise ConfigurationError(
            f"aggregate must be a function of the list of scores, e.g. aggregate=min or "
            f"aggregate=statistics.median, got {fn!r}")


def _part_reference(obj: Any, part: str) -> str:
    """`reference(obj)` of an option of a feedback, saying which one cannot be imported
    (an `aggregate=lambda ...` was refused as "a lambda" while the function was a `def`)."""
    try:
        return reference(obj)
    except NotReferenceable as exc:
        raise NotReferenceable(f"{part}: {exc}") from None


def mean_of(scores: list[float]) -> float:
    """The default aggregate of a fan-out's scores."""
    return statistics.fmean(scores)


class Feedback:
    """A feedback function and its wiring.

    Args:
        fn: a plain or `async` function returning a score: a number, a
            `(score, explanation)` pair, or a mapping with a ``"score"`` key (and optionally
            ``"explanation"`` / ``"reason"``). Raise :class:`SkipFeedback` to end `skipped`.
        name: the column name; defaults to the function's name.
        higher_is_better: how the leaderboard ranks the score (default True).
        timeout: seconds one attempt may take (None: the session's default).
        retries: extra attempts after a failure (shorthand for `retry=RetryPolicy(...)`).
        retry: a full :class:`RetryPolicy`.
        aggregate: how the scores of a fanned-out selection combine (default: mean).
        rate_limit: a :class:`RateLimit` shared with other feedbacks of its group.

    Providers can supply defaults for these options (see :func:`feedback_defaults`);
    arguments given here always win.

    Raises:
        ConfigurationError: `fn` is not callable or the options are inconsistent.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str | None = None,
        *,
        higher_is_better: bool | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        retry: RetryPolicy | None = None,
        aggregate: Aggregator | None = None,
        rate_limit: RateLimit | None = None,
    ) -> None:
        if not callable(fn):
            raise ConfigurationError(f"Feedback needs a function, got {fn!r}")
        if isinstance(fn, type) and any("__call__" in vars(c) for c in fn.__mro__[:-1]):
            # (the class of an evaluator: wired, each call made an instance of it — the
            # output given as its first option — and every result failed)
            raise ConfigurationError(
                f"Feedback({fn.__name__}) was given the class: pass an instance, "
                f"Feedback({fn.__name__}())")
        defaults = feedback_defaults(fn)
        check = defaults.pop("check", None)
        if callable(check):  # (a provider's: its optional dependency is installed, ...)
            check()
        if name is None:
            name = defaults.get("name")
        higher_is_better = (defaults.get("higher_is_better", True)
                            if higher_is_better is None else higher_is_better)
        timeout = defaults.get("timeout") if timeout is None else timeout
        if retries is None and retry is None:
            retry = defaults.get("retry")
        rate_limit = defaults.get("rate_limit") if rate_limit is None else rate_limit
        aggregate = defaults.get("aggregate") if aggregate is None else aggregate
        if retries is not None and retry is not None:
            raise ConfigurationError("give either retries= or retry=, not both")
        if retries is not None:
            _check_count(retries, "retries", 0)
        if timeout is not None:
            _check_seconds(timeout, "timeout")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            # (name="" was replaced by the function's name without a word; "  " was kept)
            raise ConfigurationError(f"a feedback needs a non-empty name: pass name='...' "
                                     f"(or leave it out for the function's name), got "
                                     f"{name!r}")
        # Options of the wrong type used to pass here and break later: a string
        # higher_is_better made the record's storage fail (the record was lost), retry=3
        # or rate_limit=5 failed every evaluation as an "internal error", and an aggregate
        # that cannot be called failed every fanned-out result.
        higher_is_better = _check_flag(higher_is_better, "higher_is_better")
        _check_policies(retry, rate_limit)
        if aggregate is not None:
            _check_aggregate(aggregate)
        self.fn = fn
        self.name = name or _function_name(fn)
        _check_name_size(self.name)
        self.higher_is_better = higher_is_better
        self.timeout = timeout
        self.retry = retry or RetryPolicy(attempts=1 + (retries or 0))
        self.aggregator: Aggregator = aggregate or mean_of
        self.rate_limit = rate_limit
        self.bindings: dict[str, Selector] = {}
        self._params = _parameters(fn)

    # ------------------------------------------------------------------ wiring
    def on(self, *selectors: Selector | Callable[[Record], Any],
           **named: Selector | Callable[[Record], Any]) -> Feedback:
        """Wire the function's parameters to selectors, positionally and/or by name."""
        new = self._copy()
        free = [p for p in self._params.names if p not in new.bindings]
        # As in a Python call: the first len(selectors) free parameters are taken by
        # position, so naming one of them too is a clash (it silently moved the positional
        # selection to the next parameter: question and answer swapped).
        clash = [key for key in named if key in free[:len(selectors)]]
        if clash:
            raise ConfigurationError(
                f"feedback {self.name!r}: parameter {clash[0]!r} of "
                f"{_function_name(self.fn)}() is given a selection both by position and by "
                f"name; wire it once (e.g. all by name: .on({clash[0]}=...))")
        for key, sel in named.items():
            if key not in self._params.names and not self._params.var_keyword:
                raise ConfigurationError(
                    f"feedback {self.name!r}: {_function_name(self.fn)}() has no parameter "
                    f"{key!r}; its parameters are {self._params.names}"
                )
            new.bindings[key] = as_selector(sel)
            if key in free:
                free.remove(key)
        if selectors and not free and self.bindings:
            raise ConfigurationError(
                f"feedback {self.name!r} is wired already ({', '.join(self.selectors.values())}"
                f"): every parameter of {_function_name(self.fn)}() has its selection. Wire it "
                "once: .on_output(), .on_input_output() or .on(...) on the unwired Feedback")
        if len(selectors) > len(free) and self._params.unreadable:
            raise ConfigurationError(
                f"feedback {self.name!r}: Python cannot read the parameters of "
                f"{_function_name(self.fn)}() (a builtin or a C function), so no selection "
                f"can be given to one by position: wrap it in a def, e.g. "
                f"def {_function_name(self.fn)}_of(values): return "
                f"{_function_name(self.fn)}(values)")
        if len(selectors) > len(free):
            variadic = ""
            if self._params.var_keyword or self._params.var_positional:
                variadic = (" (*args and **kwargs take no selections by position: name the "
                            "parameters, e.g. def relevance(question, answer), or wire them "
                            "by name with .on(question=Select.input))")
            raise ConfigurationError(
                f"feedback {self.name!r}: {_function_name(self.fn)}() takes "
                f"{len(self._params.names)} argument(s) {self._params.names} but "
                f"{len(selectors) + len(named) + len(self.bindings)} selection(s) were given"
                f"{variadic}"
            )
        for key, sel in zip(free, selectors, strict=False):
            new.bindings[key] = as_selector(sel)
        remember_defined([new])
        return new

    def on_input(self) -> Feedback:
        """Pass the record's main input as the first argument."""
        return self.on(Select.input)

    def on_output(self) -> Feedback:
        """Pass the record's main output as the first argument."""
        return self.on(Select.output)

    def on_input_output(self) -> Feedback:
        """Pass the main input and the main output as the first two arguments."""
        return self.on(Select.input, Select.output)

    def on_contexts(self) -> Feedback:
        """Pass each retrieved context (the function is called once per context)."""
        return self.on(Select.contexts)

    def call_args(self, args: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """`args` split into what goes by position (positional-only parameters, as in
        ``def f(text, /)`` or builtins such as ``len``: by name they were a TypeError on
        every record) and by name."""
        only = self._params.positional_only
        if not only:
            return [], args
        named = dict(args)
        positional = []
        for name in only:
            if name not in named:
                break  # (an unselected one keeps its default, and so must the rest)
            positional.append(named.pop(name))
        return positional, named

    def aggregate(self, fn: Aggregator) -> Feedback:
        """How the scores of a fanned-out selection are combined (default: mean)."""
        _check_aggregate(fn)
        new = self._copy()
        new.aggregator = fn
        return new

    def _copy(self) -> Feedback:
        new = copy.copy(self)
        new.bindings = dict(self.bindings)
        new.__dict__.pop("_spec", None)
        new.__dict__.pop("_id", None)
        new.__dict__.pop("_definition_row", None)
        return new

    # ------------------------------------------------------------------ identity
    @property
    def is_async(self) -> bool:
        known = self.__dict__.get("_async_of")  # (fn, answer): asked once per evaluation
        if known is not None and known[0] is self.fn:
            return bool(known[1])
        answer = _is_async_callable(self.fn)
        self.__dict__["_async_of"] = (self.fn, answer)
        return answer

    @property
    def implementation(self) -> str | None:
        """`module:qualname` of the function, or None when it cannot be imported by path."""
        module = getattr(self.fn, "__module__", None)
        qualname = getattr(self.fn, "__qualname__", None)
        if not module or not qualname or "<" in qualname:
            return None
        return f"{module}:{qualname}"

    @property
    def selectors(self) -> dict[str, str]:
        """Parameter name -> selector label, as stored with the definition."""
        return {k: repr(v) for k, v in self.bindings.items()}

    @property
    def feedback_id(self) -> str:
        """The id of the definition: its name, its function, its wiring, and what its
        scores mean — the aggregate of a fanned-out selection and `higher_is_better`.
        (Its timeout, retries and rate limit are not: a definition whose timeout changed
        is the same one, written again.)

        A function importable by path is known by that path, the same in every process
        and Python version. Any other callable — a lambda, a closure, a partial, a bound
        method, a callable object — by what makes it score as it does: its code and the
        values it holds (a partial's arguments, a closure's cells, its object's state).
        Two feedbacks of one name and function that score differently had one id: workers
        and `retry_failed` evaluated one app's results with another app's definition, and
        the leaderboard ranked both apps by one direction.
        """
        cached = self.__dict__.get("_id")
        if cached is None:
            text = repr((self.name, _callable_text(self.fn), sorted(self.selectors.items()),
                         None if self.aggregator is mean_of else
                         _callable_text(self.aggregator), self.higher_is_better))
            cached = self.__dict__["_id"] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return str(cached)

    def __setattr__(self, key: str, value: Any) -> None:
        # (a feedback renamed or re-pointed after wiring kept the id, spec and definition
        # of what it was: two renamed copies swapped their directions in the leaderboard)
        object.__setattr__(self, key, value)
        if key in _DEFINING:
            cached = self.__dict__
            for derived in ("_id", "_spec", "_definition_row"):
                cached.pop(derived, None)

    def check_wired(self) -> None:
        """Raise :class:`ConfigurationError` unless every required parameter is wired."""
        if not self.bindings:
            raise ConfigurationError(
                f"feedback {self.name!r} is not wired to anything: call .on_output(), "
                ".on_input_output(), .on_contexts() or .on(param=Select....) before "
                "passing it to a recorder"
            )
        missing = [p for p in self._params.required if p not in self.bindings]
        if missing:
            raise ConfigurationError(
                f"feedback {self.name!r}: required parameter(s) {missing} of "
                f"{_function_name(self.fn)}() are not wired; wire them with .on(...)"
            )

    # ------------------------------------------------------------------ by reference
    def spec(self) -> dict[str, Any]:
        """Everything a worker needs to rebuild this feedback, as JSON-able data.

        Raises:
            NotReferenceable: the function, a selector or the aggregate cannot be imported
                by path (a lambda, a closure, a bound method, code in ``__main__``).
        """
        cached = self.__dict__.get("_spec")
        if cached is not None:
            return dict(cached)
        bindings: dict[str, Any] = {}
        for param, selector in self.bindings.items():
            if selector.spec is None:
                raise NotReferenceable(
                    f"the selection for {param!r} ({selector.label}) cannot be rebuilt by a "
                    f"worker: {selector.why_not or 'it has no spec'}")
            bindings[param] = selector.spec
        policy = self.retry
        spec: dict[str, Any] = {
            "fn": reference(self.fn),
            "name": self.name,
            "higher_is_better": self.higher_is_better,
            "timeout": self.timeout,
            "retry": {
                "attempts": policy.attempts,
                "initial_backoff": policy.initial_backoff,
                "max_backoff": policy.max_backoff,
                "retry_on": [_part_reference(t, "its RetryPolicy.retry_on")
                             for t in policy.retry_on],
                "never_retry_on": [_part_reference(t, "its RetryPolicy.never_retry_on")
                                   for t in policy.never_retry_on],
                "deadline": policy.deadline,
                "max_retry_after": policy.max_retry_after,
            },
            "aggregate": None if self.aggregator is mean_of else _part_reference(
                self.aggregator, "its aggregate function"),
            "rate_limit": None if self.rate_limit is None else {
                "per_minute": self.rate_limit.per_minute,
                "max_concurrent": self.rate_limit.max_concurrent,
                "group": self.rate_limit.group,
            },
            "bindings": bindings,
        }
        self.__dict__["_spec"] = spec
        return dict(spec)

    def check_referenceable(self) -> None:
        """Raise :class:`ConfigurationError` unless a worker can rebuild this feedback."""
        try:
            self.spec()
        except NotReferenceable as exc:
            raise ConfigurationError(
                f"feedback {self.name!r} cannot be evaluated by a worker (deferred mode): "
                f"{exc}") from None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Feedback:
        """Rebuild a feedback from :meth:`spec` (in a worker)."""
        retry = spec.get("retry") or {}
        rate = spec.get("rate_limit")
        aggregate = spec.get("aggregate")
        fb = cls(
            resolve(spec["fn"]),
            name=spec["name"],
            higher_is_better=bool(spec.get("higher_is_better", True)),
            timeout=spec.get("timeout"),
            retry=RetryPolicy(
                attempts=int(retry.get("attempts", 1)),
                initial_backoff=float(retry.get("initial_backoff", 0.5)),
                max_backoff=float(retry.get("max_backoff", 30.0)),
                retry_on=tuple(resolve(t) for t in retry.get("retry_on", ["builtins:Exception"])),
                never_retry_on=tuple(resolve(t) for t in retry.get("never_retry_on", [])),
                deadline=retry.get("deadline"),
                max_retry_after=retry.get("max_retry_after", 300.0),
            ),
            aggregate=resolve(aggregate) if aggregate else None,
            rate_limit=RateLimit(**rate) if rate else None,
        )
        return fb.on(**{p: selector_from_spec(s) for p, s in spec["bindings"].items()})

    def __repr__(self) -> str:
        wiring = ", ".join(f"{k}={v}" for k, v in self.selectors.items())
        return f"Feedback({self.name!r}, {wiring})"

    # ------------------------------------------------------------------ copies, pickle
    def __reduce__(self) -> tuple[Any, ...]:
        """(pickle) By reference, as a worker rebuilds it: its selections hold functions
        made at run time, so pickling one (or a record holding its results, sent to
        another process) failed on a local lambda of Scrutiny's."""
        try:
            spec = self.spec()
        except NotReferenceable as exc:
            raise pickle.PicklingError(
                f"feedback {self.name!r} cannot be pickled: {exc}. Define its function "
                "at the top level of an importable module") from None
        return (Feedback.from_spec, (spec,))

    # (copy.copy and deepcopy stay copies by value, not rebuilt from the reference)
    def __copy__(self) -> Feedback:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> Feedback:
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    # ------------------------------------------------------------------ evaluation
    def calls_for(self, record: Record) -> list[dict[str, Any]]:
        """The argument sets to call the function with (several when a selection fans out).

        Raises:
            EmptySelection: a selector found nothing; the result is `skipped`.
        """
        fixed: dict[str, Any] = {}
        fanned: list[tuple[str, Sequence[Any]]] = []
        for param, selector in self.bindings.items():
            # (each call its own copy of a dict or list: a feedback that changed its
            # argument in place — lowercased contexts, appended to them — changed what the
            # others judged, and the record, depending on which ran first)
            value = snapshot(selector.select(record))
            if selector.fan_out:
                # An element with no value (the output of a span that failed) is nothing to
                # evaluate, as a whole selection of nothing is: the call is not made.
                present = [v for v in value if v is not None]
                if not present:
                    raise EmptySelection(f"{selector.label} found nothing but empty values "
                                         f"in record {record.record_id}")
                fanned.append((param, present))
            else:
                fixed[param] = value
        if not fanned:
            return [fixed]
        names = [p for p, _ in fanned]
        calls = [{**fixed, **dict(zip(names, combo, strict=True))}
                 for combo in itertools.product(*(values for _, values in fanned))]
        if len(calls) > 1 and any(type(v) in (dict, list) for v in fixed.values()):
            for call in calls[1:]:  # (one copy of a fixed dict or list per call, too)
                for param, value in fixed.items():
                    call[param] = snapshot(value)
        return calls


@dataclass(frozen=True, slots=True)
class _Params:
    names: list[str]
    required: list[str]
    var_keyword: bool
    var_positional: bool = False
    positional_only: tuple[str, ...] = ()
    unreadable: bool = False  # (Python cannot read its signature: max, numpy's ufuncs)


DEFAULTS_ATTRIBUTE = "__scrutiny_feedback__"


def feedback_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """Option defaults a provider attached to a feedback function.

    A function (or method) may carry a mapping in its ``__scrutiny_feedback__`` attribute,
    and the object a bound method belongs to may define
    ``scrutiny_feedback_defaults(method) -> Mapping``; keys are `Feedback` option names
    (name, higher_is_better, timeout, retry, rate_limit, aggregate), and ``check``: a
    function called when the feedback is made, raising if it cannot run here (an extra
    not installed). The object's values win over the function's.
    """
    found: dict[str, Any] = {}
    attached = getattr(fn, DEFAULTS_ATTRIBUTE, None)
    if isinstance(attached, Mapping):
        found.update(attached)
    owner = getattr(fn, "__self__", None)
    hook = getattr(owner, "scrutiny_feedback_defaults", None)
    if callable(hook):
        from_owner = hook(fn)
        if isinstance(from_owner, Mapping):
            found.update(from_owner)
    return found


def _parameters(fn: Callable[..., Any]) -> _Params:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return _Params([], [], True, unreadable=True)
    names: list[str] = []
    required: list[str] = []
    positional_only: list[str] = []
    var_keyword = var_positional = False
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY):
            names.append(p.name)
            if p.kind is p.POSITIONAL_ONLY:
                positional_only.append(p.name)
            if p.default is p.empty:
                required.append(p.name)
        elif p.kind is p.VAR_KEYWORD:
            var_keyword = True
        elif p.kind is p.VAR_POSITIONAL:
            var_positional = True
    return _Params(names, required, var_keyword, var_positional, tuple(positional_only))


_DEFINING = frozenset({"fn", "name", "higher_is_better", "aggregator", "bindings", "timeout",
                       "retry", "rate_limit"})
"""Attributes a feedback's id, spec or definition row are made from."""

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_TEXT_LIMIT = 4000


def _callable_text(fn: Any, depth: int = 0) -> str:
    """What makes `fn` score as it does, as text for a definition's id (see feedback_id)."""
    if depth > 4:
        return type(fn).__qualname__
    if isinstance(fn, functools.partial):
        return (f"partial({_callable_text(fn.func, depth + 1)}, {_state_text(fn.args)}, "
                f"{_state_text(sorted(fn.keywords.items()))})")
    if inspect.ismethod(fn):
        owner = fn.__self__
        if isinstance(owner, type):  # a classmethod: importable with its class
            owner_text = f"{owner.__module__}:{owner.__qualname__}"
        else:
            owner_text = _object_text(owner)
        return f"method({_callable_text(fn.__func__, depth + 1)}, {owner_text})"
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if isinstance(qualname, str) and module and "<" not in qualname:
        # (importable by path, or a function of the script or notebook: known by its
        # name everywhere, as before — its body edited is the same definition)
        return f"{module}:{qualname}"
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):  # a lambda or a closure
        cells = []
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # (a cell not filled yet)
                cells.append(None)
        defaults = (getattr(fn, "__defaults__", None), getattr(fn, "__kwdefaults__", None))
        return (f"{module}:{qualname}:{_code_text(code)}:{_state_text(cells)}:"
                f"{_state_text(defaults)}")
    return _object_text(fn)  # a callable object


def _code_text(code: types.CodeType) -> str:
    """A digest of what `code` does, the same in every process (nested code — a lambda's
    generator expression — by its own digest, not its repr with an address and a file)."""
    consts = [_code_text(c) if isinstance(c, types.CodeType) else _state_text(c)
              for c in code.co_consts]
    return hashlib.sha256(code.co_code + repr((consts, code.co_names)).encode()).hexdigest()[:16]


def _object_text(obj: Any) -> str:
    """An object by its class and state: its own repr when its class has one, else its
    attributes'."""
    cls = type(obj)
    kind = f"{cls.__module__}:{cls.__qualname__}"
    if any("__repr__" in vars(c) for c in cls.__mro__[:-1]):
        return f"{kind}({_state_text(obj)})"
    return f"{kind}({_state_text(sorted(getattr(obj, '__dict__', {}).items()))})"


_STATE_REPR = reprlib.Repr()
_STATE_REPR.maxlevel = 4
_STATE_REPR.maxstring = _STATE_REPR.maxother = 400
_STATE_REPR.maxlist = _STATE_REPR.maxtuple = _STATE_REPR.maxdict = _STATE_REPR.maxset = 40


def _state_text(value: Any) -> str:
    """repr(value), without memory addresses (the same state reads the same in every
    process), bounded (a closure over a whole dataset is not printed in full)."""
    try:
        text = _STATE_REPR.repr(value)
    except Exception:
        text = type(value).__qualname__
    return _ADDRESS.sub("", text)[:_TEXT_LIMIT]


def _function_name(fn: Callable[..., Any]) -> str:
    """The default name: a partial is named after its function (every partial was named
    "partial", so two of them clashed as duplicates, and the column said nothing)."""
    fn = _unwrap_partial(fn)
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "feedback" if name == "<lambda>" else str(name)


def _unwrap_partial(fn: Any) -> Any:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _is_async_callable(fn: Any) -> bool:
    """Whether calling `fn` gives a coroutine to await on the loop. Only a real
    functools.partial is looked through: any object with a `func` attribute was, so a
    Mock (whose `.func` is another Mock, for ever) hung the evaluation loop, and a plain
    wrapper keeping an async function in `.func` was called on the loop as async."""
    fn = _unwrap_partial(fn)
    if isinstance(fn, type):  # a class: calling it makes an instance, not a coroutine
        return False
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async __call__ of callable objects
    )


def coerce_feedback_value(value: Any) -> tuple[float, str | None, dict[str, Any]]:
    """Turn what a feedback function returned into (score, explanation, metadata).

    Raises:
        InvalidFeedbackValue: the value holds no finite number.
    """
    explanation: str | None = None
    metadata: dict[str, Any] = {}
    raw = value
    if isinstance(value, tuple) and len(value) == 2:
        value, extra = value
        if isinstance(extra, Mapping):
            metadata = dict(extra)
            explanation = _explanation_from(metadata)
        elif extra is not None:
            explanation = str(extra)
    elif isinstance(value, Mapping):
        if "score" not in value:
            raise InvalidFeedbackValue(
                f"returned a mapping without a 'score' key: {_short(raw)}", value=raw
            )
        metadata = {k: v for k, v in value.items() if k != "score"}
        explanation = _explanation_from(metadata)
        value = value["score"]
    if isinstance(value, bool):
        return float(value), explanation, metadata
    if _numeric(value):
        try:
            score = float(value)
        except (OverflowError, TypeError, ValueError) as exc:
            raise InvalidFeedbackValue(f"returned {_short(value)}, which is not a float: "
                                       f"{exc}", value=raw) from None
        if not math.isfinite(score):
            if isinstance(value, decimal.Decimal) and value.is_finite():  # ("1e400")
                raise InvalidFeedbackValue(f"returned {_short(value)}, which is too large "
                                           "for a float", value=raw)
            raise InvalidFeedbackValue(f"returned {score}, which is not a finite number",
                                       value=raw)
        return score, explanation, metadata
    raise InvalidFeedbackValue(
        f"returned {_short(raw)} ({type(raw).__name__}); a feedback must return a number, "
        "a (number, explanation) pair or a mapping with a 'score' key",
        value=raw,
    )


def _numeric(value: Any) -> bool:
    """A real number by any other name: numbers.Real (int, float, numpy's floats and ints),
    Decimal, numpy's bool and a 0-d array (what ``(a > b).all()`` or ``np.mean`` give) —
    not text, not a complex number, not an array of several values."""
    if isinstance(value, numbers.Real | decimal.Decimal):
        return True
    if isinstance(value, str | bytes | complex) or not hasattr(value, "__float__"):
        return False
    return getattr(value, "ndim", 0) == 0 and getattr(value, "dtype", None) is not None and \
        getattr(value.dtype, "kind", "") in "biuf"


def _explanation_from(metadata: Mapping[str, Any]) -> str | None:
    for key in ("explanation", "reason", "reasons"):
        if key in metadata and metadata[key] is not None:
            return str(metadata[key])
    return None


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
