"""Feedback definitions: wiring, value coercion, selectors."""

from __future__ import annotations

import concurrent.futures
import decimal
import functools
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from scrutiny import (
    ConfigurationError,
    Feedback,
    FeedbackStatus,
    InvalidFeedbackValue,
    RateLimit,
    Record,
    RetryPolicy,
    Select,
    Session,
    Span,
)
from scrutiny.core._feedback import coerce_feedback_value
from scrutiny.core._select import EmptySelection


def _record(**kw: object) -> Record:
    base: dict[str, object] = {"app_name": "a", "app_version": "v1", "input": "q",
                               "output": "answer", "contexts": ["c1", "c2"]}
    base.update(kw)
    return Record(**base)  # type: ignore[arg-type]


def test_on_output_binds_the_first_parameter() -> None:
    fb = Feedback(lambda text: 1.0, name="x").on_output()
    assert fb.selectors == {"text": "Select.output"}


def test_on_input_output_binds_two_parameters_in_order() -> None:
    def rel(question: str, answer: str) -> float:
        return 1.0

    fb = Feedback(rel).on_input_output()
    assert fb.name == "rel"
    assert fb.calls_for(_record()) == [{"question": "q", "answer": "answer"}]


def test_named_selectors() -> None:
    fb = Feedback(lambda a, b: 1.0, name="x").on(b=Select.input, a=Select.output)
    assert fb.calls_for(_record()) == [{"a": "answer", "b": "q"}]


def test_wiring_returns_a_new_feedback() -> None:
    base = Feedback(lambda x: 1.0, name="x")
    wired = base.on_output()
    assert base.bindings == {}
    assert wired is not base


def test_too_many_selectors_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="takes 1 argument"):
        Feedback(lambda x: 1.0, name="x").on(Select.input, Select.output)


def test_variadic_functions_wired_by_position_are_told_to_name_their_parameters() -> None:
    for fn in (lambda **kw: 1.0, lambda *args: 1.0):
        with pytest.raises(ConfigurationError, match=r"\*args and \*\*kwargs take no "
                                                     r"selections by position: name the"):
            Feedback(fn, name="v").on_input_output()


def test_unknown_parameter_name_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="no parameter 'nope'"):
        Feedback(lambda x: 1.0, name="x").on(nope=Select.input)


def test_unwired_feedback_is_refused_with_advice() -> None:
    with pytest.raises(ConfigurationError, match="on_output"):
        Feedback(lambda x: 1.0, name="x").check_wired()


def test_missing_required_parameter_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"\['b'\]"):
        Feedback(lambda a, b: 1.0, name="x").on(a=Select.input).check_wired()


def test_not_callable_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        Feedback(42)  # type: ignore[arg-type]


def test_retries_and_retry_are_exclusive() -> None:
    with pytest.raises(ConfigurationError):
        Feedback(lambda x: 1.0, retries=1, retry=RetryPolicy(attempts=2))


@pytest.mark.parametrize("make", [
    lambda: Feedback(lambda x: 1.0, timeout=math.nan),
    lambda: Feedback(lambda x: 1.0, timeout=math.inf),
    lambda: Feedback(lambda x: 1.0, timeout="5"),
    lambda: Feedback(lambda x: 1.0, retries=1.5),
    lambda: RetryPolicy(attempts=2.5),
    lambda: RetryPolicy(attempts=True),
    lambda: RetryPolicy(max_backoff=math.nan),
    lambda: RetryPolicy(initial_backoff=math.inf),
    lambda: RetryPolicy(deadline=math.nan),
    lambda: RateLimit(per_minute=math.nan),
    lambda: RateLimit(per_minute=math.inf),
    lambda: RateLimit(max_concurrent=1.5),
], ids=["timeout-nan", "timeout-inf", "timeout-str", "retries-float", "attempts-float",
        "attempts-bool", "max_backoff-nan", "initial_backoff-inf", "deadline-nan",
        "per_minute-nan", "per_minute-inf", "max_concurrent-float"])
def test_numbers_that_are_no_durations_or_counts_are_refused(make: Any) -> None:
    """A NaN timeout passed every `<= 0` check and, as a timer, broke the loop's timer
    heap: unrelated feedbacks failed with timeouts they never had."""
    with pytest.raises(ConfigurationError, match="must be a"):
        make()


def test_contexts_fan_out_one_call_per_context() -> None:
    fb = Feedback(lambda q, c: 1.0, name="x").on(Select.input, Select.contexts)
    assert fb.calls_for(_record()) == [{"q": "q", "c": "c1"}, {"q": "q", "c": "c2"}]


@pytest.mark.parametrize("collection", [
    lambda r: (c for c in r.contexts), lambda r: dict(enumerate(r.contexts)).values(),
    lambda r: np.array(r.contexts), lambda r: pd.Series(r.contexts)])
def test_a_fan_out_over_any_collection_calls_once_per_element(collection: Any) -> None:
    """A generator, a dict's values, a numpy array or a pandas Series was passed whole, in
    one call (which scored it 0), as if it were one element."""
    fb = Feedback(lambda c: 1.0, name="x").on(Select.custom(collection, fan_out=True))
    assert fb.calls_for(_record()) == [{"c": "c1"}, {"c": "c2"}]
    with pytest.raises(EmptySelection):
        fb.calls_for(_record(contexts=[]))


def test_a_field_of_the_selected_value_is_selected_by_its_key() -> None:
    """TruLens lenses read fields (`Select.RecordOutput["answer"]`): it raised "'Selector'
    object is not subscriptable", and `Select.RecordInput.question` a bare AttributeError."""
    from scrutiny.core._select import selector_from_spec

    record = _record(output={"answer": "Paris", "sources": ["a", "b"]},
                     metadata={"user": {"tier": "pro"}})
    answer = Feedback(lambda a: 1.0, name="x").on(Select.output["answer"])
    assert answer.calls_for(record) == [{"a": "Paris"}]
    first = Feedback(lambda s: 1.0, name="x").on(Select.output["sources"][0])
    assert first.calls_for(record) == [{"s": "a"}]
    tier = Select.metadata("user")["tier"]
    assert tier.select(record) == "pro"
    assert selector_from_spec(tier.spec or {}).select(record) == "pro"  # (workers)
    assert repr(Select.output["answer"]) == "Select.output['answer']"
    with pytest.raises(EmptySelection, match=r"Select.output\['missing'\] found nothing"):
        Feedback(lambda a: 1.0, name="x").on(Select.output["missing"]).calls_for(record)
    with pytest.raises(ConfigurationError, match=r"is Select.input\['question'\]"):
        Select.input.question
    assert not hasattr(Select.input, "question")
    spans = [Span("1", None, "root", "chain", 0.0, outputs="o"),
             Span("2", "1", "search", "tool", 0.0, outputs={"hits": 3}),
             Span("3", "1", "search", "tool", 0.0, outputs={"hits": 5})]
    hits = Select.spans(kind="tool").outputs["hits"]
    assert hits.select(_record(spans=spans)) == [3, 5]  # (of each span's output)


def test_collect_passes_the_whole_list() -> None:
    fb = Feedback(lambda cs: 1.0, name="x").on(Select.contexts.collect())
    assert fb.calls_for(_record()) == [{"cs": ["c1", "c2"]}]


def test_empty_selection_raises_empty_selection() -> None:
    fb = Feedback(lambda c: 1.0, name="x").on_contexts()
    with pytest.raises(EmptySelection, match=r"Select\.contexts found nothing"):
        fb.calls_for(_record(contexts=[]))


def test_an_empty_list_or_dict_answer_is_evaluated_as_an_empty_text_is() -> None:
    """An extractor that answered [] or {} was `skipped` ("Select.output found nothing"),
    so the leaderboard's mean left out exactly its bad answers."""
    found_any = Feedback(lambda out: float(bool(out)), name="x").on_output()
    for empty in ([], {}, ""):
        assert found_any.calls_for(_record(output=empty)) == [{"out": empty}]
    with pytest.raises(EmptySelection):  # (no answer at all: the call failed)
        found_any.calls_for(_record(output=None))
    with pytest.raises(EmptySelection):  # (a selection of several that found none)
        Feedback(lambda c: 1.0, name="x").on_contexts().calls_for(_record(contexts=[]))


def test_a_fanned_out_element_with_no_value_is_not_called() -> None:
    """The output of a tool span that failed is None: the feedback was called with it,
    raised, and the whole result ended failed for one failed tool."""
    spans = [Span("1", None, "root", "chain", 0.0, outputs="o"),
             Span("2", "1", "search", "tool", 0.0, outputs=None, error="boom"),
             Span("3", "1", "lookup", "tool", 0.0, outputs="found it")]
    fb = Feedback(lambda out: 1.0, name="x").on(Select.spans(kind="tool").outputs.each())
    assert fb.calls_for(_record(spans=spans)) == [{"out": "found it"}]
    only_failed = [spans[0], spans[1]]
    with pytest.raises(EmptySelection, match="nothing but empty values"):
        fb.calls_for(_record(spans=only_failed))


def test_span_selector_and_custom_callable() -> None:
    spans = [Span("1", None, "root", "chain", 0.0, outputs="o1"),
             Span("2", "1", "llm", "llm", 0.0, outputs="o2")]
    rec = _record(spans=spans)
    fb = Feedback(lambda outs: 1.0, name="x").on(Select.spans(kind="llm").outputs)
    assert fb.calls_for(rec) == [{"outs": ["o2"]}]
    fb2 = Feedback(lambda n: 1.0, name="y").on(lambda r: len(r.spans))
    assert fb2.calls_for(rec) == [{"n": 2}]


def test_span_kind_llm_selects_chat_models_too_and_an_unknown_kind_is_refused() -> None:
    """A LangChain chat model's span is a `chat_model`: kind="llm" (the README's example)
    found nothing in a chat app, and a misspelt kind made a feedback that was always
    skipped."""
    spans = [Span("1", None, "root", "chain", 0.0, outputs="o1"),
             Span("2", "1", "FakeListChatModel", "chat_model", 0.0, outputs="chat"),
             Span("3", "1", "FakeListLLM", "llm", 0.0, outputs="completion")]
    rec = _record(spans=spans)
    fb = Feedback(lambda outs: 1.0, name="x").on(Select.spans(kind="llm").outputs)
    assert fb.calls_for(rec) == [{"outs": ["chat", "completion"]}]
    only_chat = Feedback(lambda outs: 1.0, name="c").on(Select.spans(kind="chat_model").outputs)
    assert only_chat.calls_for(rec) == [{"outs": ["chat"]}]
    with pytest.raises(ConfigurationError, match=r"kind='lmm'.*use one of.*'chat_model'"):
        Select.spans(kind="lmm")


def test_a_model_call_made_inside_another_is_selected_once() -> None:
    """LlamaIndex's `llm.predict` calls `complete`, `astream_chat` reads `stream_chat`,
    which reads `stream_complete`: one model call, and a check of "every model call" ran
    once per level. The innermost call (what reached the model) stands for it."""
    spans = [Span("1", None, "query", "query", 0.0, outputs="answer"),
             Span("2", "1", "MockLLM.predict", "llm", 0.0, outputs="p"),
             Span("3", "2", "MockLLM.complete", "llm", 0.0, outputs="c"),
             Span("4", "1", "MockLLM.astream_chat", "chat_model", 0.0, outputs="a"),
             Span("5", "4", "MockLLM.stream_chat", "chat_model", 0.0, outputs="s"),
             Span("6", "5", "MockLLM.stream_complete", "llm", 0.0, outputs="sc"),
             Span("7", "1", "other", "llm", 0.0, outputs="alone")]
    rec = _record(spans=spans)
    each = Feedback(lambda out: 1.0, name="x").on(Select.spans(kind="llm").outputs.each())
    assert each.calls_for(rec) == [{"out": "c"}, {"out": "sc"}, {"out": "alone"}]
    chats = Feedback(lambda outs: 1.0, name="c").on(Select.spans(kind="chat_model").outputs)
    assert chats.calls_for(rec) == [{"outs": ["s"]}]
    # a span named is selected as named, wrapping or not
    named = Feedback(lambda outs: 1.0, name="n").on(
        Select.spans(kind="llm", name="MockLLM.predict").outputs)
    assert named.calls_for(rec) == [{"outs": ["p"]}]
    looped = [Span("a", "b", "m1", "llm", 0.0, outputs="1"),  # (a hand-built cycle)
              Span("b", "a", "m2", "llm", 0.0, outputs="2")]
    with pytest.raises(EmptySelection):  # (the walk up ends)
        each.calls_for(_record(spans=looped))


def test_feedback_id_depends_on_wiring() -> None:
    def f(x: str) -> float:
        return 1.0

    assert Feedback(f).on_input().feedback_id != Feedback(f).on_output().feedback_id
    assert Feedback(f).on_input().feedback_id == Feedback(f).on_input().feedback_id


def test_implementation_path_of_module_function_and_lambda() -> None:
    def local(x: str) -> float:
        return 1.0

    assert Feedback(math.sqrt).implementation is not None
    assert Feedback(lambda x: 1.0, name="l").implementation is None
    assert Feedback(local).implementation is None  # a closure cannot be imported by path


@pytest.mark.parametrize(
    ("value", "score", "explanation"),
    [
        (1, 1.0, None),
        (0.25, 0.25, None),
        (True, 1.0, None),
        (np.float32(0.5), 0.5, None),
        (np.int64(3), 3.0, None),
        (np.bool_(True), 1.0, None),  # what (scores > x).all() returns
        (np.array(0.7), 0.7, None),  # what some numpy reductions return
        (decimal.Decimal("0.75"), 0.75, None),
        ((0.7, "because"), 0.7, "because"),
        ((0.7, {"reason": "ok", "n": 2}), 0.7, "ok"),
        ({"score": 0.1, "explanation": "low"}, 0.1, "low"),
    ],
)
def test_coercion_of_good_values(value: object, score: float, explanation: str | None) -> None:
    got_score, got_expl, _ = coerce_feedback_value(value)
    assert got_score == pytest.approx(score)
    assert got_expl == explanation


@pytest.mark.parametrize(
    "value", ["0.5", None, float("nan"), float("inf"), {"value": 1}, [0.5], object(),
              10**400, 1 + 2j, np.array([0.5, 0.5]), decimal.Decimal("NaN")]
)
def test_coercion_rejects_non_scores_with_the_value_kept(value: object) -> None:
    with pytest.raises(InvalidFeedbackValue) as info:
        coerce_feedback_value(value)
    assert info.value.value is value


def test_provider_defaults_are_used_and_explicit_options_win() -> None:
    from scrutiny import RateLimit

    class Judge:
        limit = RateLimit(per_minute=60, group="judge")

        def scrutiny_feedback_defaults(self, method: object) -> dict[str, object]:
            return {"rate_limit": self.limit, "retry": RetryPolicy(attempts=3),
                    "timeout": 30.0}

        def harm(self, text: str) -> float:
            return 0.0

    harm_fn = Judge.harm
    harm_fn.__scrutiny_feedback__ = {"higher_is_better": False}  # type: ignore[attr-defined]
    judge = Judge()
    fb = Feedback(judge.harm).on_output()
    assert fb.higher_is_better is False
    assert fb.rate_limit is Judge.limit
    assert fb.retry.attempts == 3
    assert fb.timeout == 30.0
    explicit = Feedback(judge.harm, timeout=5.0, higher_is_better=True, retries=0)
    assert (explicit.timeout, explicit.higher_is_better, explicit.retry.attempts) == (5.0, True, 1)


def _length(output: str) -> float:
    return float(len(output))


def test_a_stored_spec_rebuilds_every_option_a_worker_needs() -> None:
    """RetryPolicy.deadline was left out of the spec: a worker retried for as long as
    attempts allowed while the same feedback in-process stopped at its deadline."""
    fb = Feedback(_length, name="length", higher_is_better=False, timeout=7.5,
                  retry=RetryPolicy(attempts=6, initial_backoff=0.2, max_backoff=0.4,
                                    retry_on=(ValueError,), never_retry_on=(KeyError,),
                                    deadline=1.5, max_retry_after=42.0),
                  rate_limit=RateLimit(per_minute=30, max_concurrent=2, group="g"),
                  aggregate=max).on_output()
    again = Feedback.from_spec(fb.spec())
    assert again.retry == fb.retry
    assert (again.name, again.higher_is_better, again.timeout, again.rate_limit,
            again.aggregator, again.feedback_id) == (
        fb.name, fb.higher_is_better, fb.timeout, fb.rate_limit, fb.aggregator,
        fb.feedback_id)


def test_a_parameter_given_by_position_and_by_name_is_refused() -> None:
    """`.on(Select.input, question=Select.output)` moved the positional selection to the
    next parameter: question and answer silently swapped."""
    def two(question: str, answer: str) -> float:
        return 1.0

    with pytest.raises(ConfigurationError, match="both by position and by name"):
        Feedback(two).on(Select.input, question=Select.output)
    fb = Feedback(two).on(Select.output, answer=Select.input)  # as a Python call would
    assert fb.calls_for(_record()) == [{"question": "answer", "answer": "q"}]


def _fails(output: str) -> float:
    raise ValueError("no score today")


def _judge(output: str, model: str) -> float:
    return 0.5


def _grade(output: str, model: str) -> float:
    return 1.0


@pytest.mark.parametrize("make", [
    lambda: Feedback(_length, higher_is_better="no"),  # type: ignore[arg-type]
    lambda: Feedback(_length, higher_is_better=2),  # type: ignore[arg-type]
    lambda: Feedback(_length, retry=3),  # type: ignore[arg-type]
    lambda: Feedback(_length, rate_limit=60),  # type: ignore[arg-type]
    lambda: Feedback(_length, aggregate="mean"),  # type: ignore[arg-type]
    lambda: Feedback(_length).on_contexts().aggregate(5),  # type: ignore[arg-type]
    lambda: RetryPolicy(retry_on=(KeyError, "TimeoutError")),  # type: ignore[arg-type]
    lambda: RetryPolicy(never_retry_on=[ValueError, 3]),  # type: ignore[arg-type]
    lambda: Feedback(_length, name=""),
    lambda: Feedback(_length, name="   "),
], ids=["higher_is_better-str", "higher_is_better-2", "retry-int", "rate_limit-int",
        "aggregate-str", "aggregate-method-int", "retry_on-str", "never_retry_on-int",
        "name-empty", "name-blank"])
def test_options_of_the_wrong_type_are_refused_when_the_feedback_is_defined(
        make: Any) -> None:
    """They passed the definition and broke later: higher_is_better="no" made storing the
    record fail (the record was lost), retry=3 and rate_limit=60 failed every evaluation
    as an "internal error", an aggregate that is no function failed every fanned-out
    result, name="" was silently replaced by the function's name and "   " was kept."""
    with pytest.raises(ConfigurationError, match=r"must be|non-empty name"):
        make()


def test_a_feedback_name_too_long_for_every_database_is_refused_when_defined() -> None:
    """A name of some kilobytes (a criterion's text) was taken, and PostgreSQL refused the
    index row of each result: every record evaluated with it was lost there, while SQLite
    stored it."""
    with pytest.raises(ConfigurationError, match="at most 512"):
        Feedback(_length, name="Is the answer grounded in the context? " * 80)
    with pytest.raises(ConfigurationError, match="at most 512"):
        Feedback(_length, name="é" * 257)  # (2 bytes each)
    assert Feedback(_length, name="é" * 256).name == "é" * 256


def test_bool_like_options_and_a_single_exception_class_are_taken_as_meant() -> None:
    fb = Feedback(_length, higher_is_better=np.bool_(False))  # type: ignore[arg-type]
    assert fb.higher_is_better is False
    assert RetryPolicy(retry_on=ValueError).retry_on == (ValueError,)  # type: ignore[arg-type]
    assert RetryPolicy(never_retry_on=[KeyError]).never_retry_on == (  # type: ignore[arg-type]
        KeyError,)


def test_a_single_retry_on_class_no_longer_loses_the_record(tmp_path: Path) -> None:
    """`retry_on=ValueError` (not a tuple) broke the stored definition of the feedback:
    the record itself was not stored and the result said "not evaluated"."""
    fb = Feedback(_fails, retry=RetryPolicy(attempts=2, initial_backoff=0.0,
                                            retry_on=ValueError)).on_output()  # type: ignore[arg-type]
    with Session(f"sqlite:///{tmp_path}/x.sqlite") as session:
        record = session.ingest(_record(), [fb])
        result = record.wait_for_feedback_results(timeout=10)[fb]
        assert result.status is FeedbackStatus.FAILED
        assert result.error is not None
        assert "no score today (after 2 attempts)" in result.error
        df, cols = session.get_records_and_feedback()
    assert cols == ["_fails"]
    assert list(df["record_id"]) == [record.record_id]


def test_a_stored_spec_keeps_an_empty_retry_on() -> None:
    """retry_on=() (retry nothing) came back from the stored spec as (Exception,): a
    worker retried every failure the in-process evaluation gave up on at once."""
    fb = Feedback(_length, retry=RetryPolicy(attempts=3, retry_on=())).on_output()
    assert Feedback.from_spec(fb.spec()).retry == fb.retry


class _SyncWrapper:
    """A plain callable that keeps the async function it runs in `.func`."""

    def __init__(self, func: Any) -> None:
        self.func = func

    def __call__(self, output: str) -> float:
        import asyncio

        return float(asyncio.run(self.func(output)))


class _EndlessFunc:
    """Like a Mock: `.func` is always there, and leads to itself."""

    @property
    def func(self) -> _EndlessFunc:
        return self

    def __call__(self, output: str) -> float:
        return 0.25


async def _async_score(output: str) -> float:
    return 0.75


class _AsyncJudge:
    async def __call__(self, output: str) -> float:
        return 0.5


def test_only_a_real_partial_is_looked_through_to_tell_an_async_function(
        tmp_path: Path) -> None:
    """Any object with a `func` attribute was taken for a functools.partial: a Mock
    (whose `.func` is another Mock, for ever) hung the evaluation loop, and a plain wrapper
    keeping an async function in `.func` was run on the loop as async (and failed)."""
    endless = Feedback(_EndlessFunc(), name="endless").on_output()
    answer: list[bool] = []
    thread = threading.Thread(target=lambda: answer.append(endless.is_async), daemon=True)
    thread.start()
    thread.join(5)
    assert answer == [False]
    assert Feedback(functools.partial(_AsyncJudge())).is_async
    with pytest.raises(ConfigurationError, match="pass an instance"):  # (not its class)
        Feedback(_AsyncJudge, name="cls")
    wrapped = Feedback(_SyncWrapper(_async_score), name="wrapped").on_output()
    assert not wrapped.is_async
    with Session(f"sqlite:///{tmp_path}/x.sqlite") as session:
        record = session.ingest(_record(), [wrapped, endless])
        results = record.wait_for_feedback_results(timeout=10)
    assert (results[wrapped].status, results[wrapped].result) == (FeedbackStatus.DONE, 0.75)
    assert (results[endless].status, results[endless].result) == (FeedbackStatus.DONE, 0.25)


def test_a_partial_is_named_after_its_function(tmp_path: Path) -> None:
    """Every partial was named "partial": two of them were refused as duplicates, and the
    results column said nothing of what it judged."""
    judge = Feedback(functools.partial(_judge, model="small")).on_output()
    grade = Feedback(functools.partial(functools.partial(_grade), model="big")).on_output()
    assert (judge.name, grade.name) == ("_judge", "_grade")
    with Session(f"sqlite:///{tmp_path}/x.sqlite") as session:
        record = session.ingest(_record(), [judge, grade])
        results = record.wait_for_feedback_results(timeout=10)
    assert [results[f].result for f in (judge, grade)] == [0.5, 1.0]


def test_a_selection_that_finds_nothing_says_what_the_record_has(tmp_path: Path) -> None:
    """A misspelt span name (or metadata key) was skipped on every record with only
    "found nothing": nothing said that the span was there under another name."""
    spans = [Span("1", None, "root", "chain", 0.0, outputs="o"),
             Span("2", "1", "retriever", "retriever", 0.0, outputs=["doc"])]
    by_name = Feedback(lambda out: 1.0, name="by_name").on(
        Select.spans(name="retreiver").outputs.each())
    by_key = Feedback(lambda v: 1.0, name="by_key").on(Select.metadata("user"))
    unset = Feedback(lambda v: 1.0, name="unset").on(Select.metadata("lang"))
    with Session(f"sqlite:///{tmp_path}/x.sqlite") as session:
        record = session.ingest(_record(spans=spans, metadata={"usr": 1, "lang": None}),
                                [by_name, by_key, unset])
        results = record.wait_for_feedback_results(timeout=10)
        bare = session.ingest(_record(), [by_name])
        bare_result = bare.wait_for_feedback_results(timeout=10)[by_name]
    assert {r.status for r in results.values()} == {FeedbackStatus.SKIPPED}
    assert "its spans: 'root' (chain), 'retriever' (retriever)" in str(results[by_name].error)
    assert "its metadata keys: 'usr', 'lang'" in str(results[by_key].error)
    assert "its metadata has 'lang' set to None" in str(results[unset].error)
    assert bare_result.status is FeedbackStatus.SKIPPED
    assert "the record has no spans" in str(bare_result.error)


def _half(output: str) -> float:
    return 0.5


def test_a_timeout_too_long_for_a_thread_wait_is_refused_when_defined(tmp_path: Path) -> None:
    """timeout=1e12 was accepted, and every call run on an executor failed with
    "OverflowError: timestamp out of range for platform time_t" (the wait for its
    thread); the longest that works is accepted."""
    for make in (lambda: Feedback(_half, timeout=1e12),
                 lambda: RetryPolicy(deadline=1e300),
                 lambda: RetryPolicy(max_backoff=1e300)):
        with pytest.raises(ConfigurationError, match="at most"):
            make()
    longest = Feedback(_half, timeout=threading.TIMEOUT_MAX).on_output()
    with concurrent.futures.ThreadPoolExecutor(1) as executor, Session(
            f"sqlite:///{tmp_path}/x.sqlite", executor=executor) as session:
        record = session.ingest(_record(), [longest])
        result = record.wait_for_feedback_results(timeout=10)[longest]
    assert (result.status, result.result) == (FeedbackStatus.DONE, 0.5)


def test_a_name_given_where_a_selector_goes_is_a_configuration_error_naming_it() -> None:
    def judge(output: str) -> float:
        return 1.0

    with pytest.raises(ConfigurationError, match=r"did you mean Select\.output\?"):
        Feedback(judge).on("output")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="a callable"):
        Feedback(judge).on(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "shown"), [
    (decimal.Decimal("1e400"), "Decimal\\(.1E+400.\\), which is too large for a float"),
    (decimal.Decimal("-Infinity"), "-inf, which is not a finite number"),
    (float("nan"), "nan, which is not a finite number"),
])
def test_a_score_no_float_holds_is_named_as_returned(value: object, shown: str) -> None:
    with pytest.raises(InvalidFeedbackValue, match="returned " + shown.replace("+", r"\+")):
        coerce_feedback_value(value)


def test_walking_a_records_spans_gives_each_once_whatever_their_ids() -> None:
    """Two spans of one id, one the other's child (a record built by hand), made the walk
    (and the dashboard's record view) loop for ever; spans whose parents form a cycle were
    left out of it."""
    tree = [Span("r", None, "root", "chain", 0.0), Span("a", "r", "a", "llm", 1.0),
            Span("b", "r", "b", "tool", 2.0), Span("c", "a", "c", "parser", 3.0)]
    assert [(d, s.name) for d, s in _record(spans=tree).walk()] == [
        (0, "root"), (1, "a"), (2, "c"), (1, "b")]
    twins = [Span("1", None, "first", "chain", 0.0), Span("1", "1", "second", "chain", 1.0)]
    assert [(d, s.name) for d, s in _record(spans=twins).walk()] == [
        (0, "first"), (1, "second")]
    looped = [Span("r", None, "root", "chain", 0.0), Span("x", "y", "x", "chain", 1.0),
              Span("y", "x", "y", "chain", 2.0), Span("s", "s", "self", "chain", 3.0)]
    assert [(d, s.name) for d, s in _record(spans=looped).walk()] == [
        (0, "root"), (0, "x"), (1, "y"), (0, "self")]


def test_a_builtin_whose_parameters_cannot_be_read_is_refused_saying_to_wrap_it() -> None:
    """Feedback(max).on(...) said "max() takes 0 argument(s) [] ... name the parameters",
    of a function whose parameters the user cannot name."""
    with pytest.raises(ConfigurationError, match=r"cannot read the parameters of max\(\).*"
                                                 r"def max_of\(values\)"):
        Feedback(max, name="x").on(Select.contexts.collect())


def test_each_call_gets_its_own_copy_of_a_list_or_dict_it_may_change() -> None:
    """A feedback that changed its argument in place (contexts lowercased, appended to)
    changed what the other feedbacks judged, and the record, depending on which ran
    first; in deferred mode each had read its own copy from the database."""
    record = _record(contexts=["Paris", "Rome"], output={"answer": "Paris"})
    whole = Feedback(lambda cs, out: 1.0, name="x").on(Select.contexts.collect(),
                                                        Select.output)
    [call] = whole.calls_for(record)
    call["cs"].append("injected")
    call["out"]["answer"] = "changed"
    assert record.contexts == ["Paris", "Rome"]
    assert record.output == {"answer": "Paris"}
    each = Feedback(lambda c, out: 1.0, name="x").on(Select.contexts, Select.output)
    first, second = each.calls_for(record)
    first["out"]["answer"] = "changed"
    assert second["out"] == {"answer": "Paris"}
