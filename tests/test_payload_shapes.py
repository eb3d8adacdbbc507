"""Payloads of awkward shapes stored as they are promised to be: long LangGraph loops at a
cost growing with what they hold (not its square), a giant int replacing only itself, an
error within the payload limit, and every value the serializer cut marked as cut."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import FakeListChatModel
from langchain_core.messages import BaseMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from scrutiny import Feedback, FeedbackStatus, Record, Session, Span
from scrutiny.core import _rows, _serialize
from scrutiny.core._serialize import TRUNCATED_KEY
from scrutiny.integrations.langchain import ChainRecorder

GIANT = 10 ** 5000  # past Python's 4,300 digits for int <-> text


def _record(**kw: Any) -> Record:
    base: dict[str, Any] = {"app_name": "shapes", "app_version": "v1", "input": "q",
                            "output": "a", "start_time": 1.0, "end_time": 2.0}
    base.update(kw)
    return Record(**base)


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels):
        value = {"k": value}
    return value


# Deferred feedbacks (importable: tests.test_payload_shapes)
def depth_of(input: Any) -> float:
    depth = 0
    while isinstance(input, dict) and "k" in input:
        input, depth = input["k"], depth + 1
    return float(depth)


def question_length(input: Any) -> float:
    return float(len(input["question"]))


# ------------------------------------------------------------------- a long LangGraph loop
def _loop(steps: int) -> Any:
    """A graph whose one node runs `steps` times, each adding a model's answer: each step's
    span holds the conversation so far."""
    model = FakeListChatModel(responses=[f"step {i}: " + "blah " * 20 for i in range(steps)])

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", agent)
    graph.add_edge(START, "agent")
    graph.add_conditional_edges(
        "agent", lambda state: END if len(state["messages"]) > steps else "agent")
    return graph.compile()


def test_a_long_graph_loop_converts_each_message_once_per_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each span of a loop's record was cut with a memo of its own, so each message was
    converted once per span holding it: 252,503 pydantic dumps for a 500-step loop's ~500
    messages, seconds of the writer's CPU growing with the square of the steps."""
    steps = 40
    app = _loop(steps)
    # (its span tree, ~820 kB, is over its share of 4 x 50 kB: each span's parts are cut)
    with Session(f"sqlite:///{tmp_path}/loop.sqlite", max_payload_bytes=50_000) as session:
        recorder = ChainRecorder(app, app_name="loop", session=session)
        with recorder as recording:
            app.invoke({"messages": [("user", "go")]}, {"recursion_limit": steps + 10})
        record = recording.get()
        assert session.flush(30)
        stored = session.get_record(record.record_id)
    assert stored is not None
    assert len(stored.spans) == len(record.spans) > steps
    cut = [s for s in stored.spans if _rows.truncation(s.inputs) is not None]
    assert cut  # (the tree is over its share: the parts are cut, each saying so)

    dumped: collections.Counter[int] = collections.Counter()
    original = BaseMessage.model_dump

    def counting(self: BaseMessage, *args: Any, **kw: Any) -> Any:
        dumped[id(self)] += 1
        return original(self, *args, **kw)

    monkeypatch.setattr(BaseMessage, "model_dump", counting)
    _rows._spans_json(record.spans, 200_000, compress=True)
    assert len(dumped) > steps
    assert max(dumped.values()) == 1, dumped.most_common(3)
    dumped.clear()
    _rows.record_row(record, max_bytes=50_000, compress_spans=True)
    assert max(dumped.values()) <= 3  # (the span tree, the input, the output)


# ------------------------------------------------------------------------- a giant int
def test_a_giant_int_replaces_only_itself(tmp_path: Path) -> None:
    """`str()` of an int over 4,300 digits raises: the whole span tree (or the whole
    input) was stored as ``<repr failed: ValueError>``, the question lost with it."""
    spans = [Span("1", None, "root", "chain", 1.0, end_time=2.0, outputs="answer"),
             Span("2", "1", "compute", "chain", 1.0, end_time=2.0,
                  outputs={"question": "How big?", "n": GIANT})]
    with Session(f"sqlite:///{tmp_path}/ints.sqlite") as session:
        record = session.ingest(_record(input={"question": "How big?", "n": GIANT,
                                               GIANT: "a key"}, spans=spans), [])
        assert session.flush(10)
        stored = session.get_record(record.record_id)
    assert stored is not None
    assert stored.input["question"] == "How big?"
    assert stored.input["n"][TRUNCATED_KEY] is True
    assert int(stored.input["n"]["hex"], 16) == GIANT  # (nothing of it is lost)
    assert "16610 bits" in (_rows.truncation(stored.input) or "")
    assert stored.input[hex(GIANT)] == "a key"
    assert [s.name for s in stored.spans] == ["root", "compute"]
    assert stored.spans[0].outputs == "answer"
    assert stored.spans[1].outputs["question"] == "How big?"
    assert int(stored.spans[1].outputs["n"]["hex"], 16) == GIANT


# ------------------------------------------------------------------------- a big error
def test_a_records_error_is_cut_to_the_payload_limit(tmp_path: Path) -> None:
    """A call failing with a 20 MB message (an API error echoing the prompt) stored it
    whole, whatever max_payload_bytes said."""
    with Session(f"sqlite:///{tmp_path}/err.sqlite", max_payload_bytes=100_000) as session:
        record = session.ingest(_record(output=None, error="e" * 2_000_000), [])
        assert session.flush(10)
        stored = session.get_record(record.record_id)
    assert stored is not None
    assert stored.error is not None
    assert len(stored.error.encode()) <= 100_000
    assert stored.error.startswith("e" * 1000)
    assert stored.error.endswith(f"[{TRUNCATED_KEY}: 2000000 bytes in all]")


def test_a_results_metadata_over_the_limit_reads_back_as_the_marker(tmp_path: Path) -> None:
    """A (score, metadata) answer over max_payload_bytes read back with no calls at all:
    its model, verdicts and the rest were gone without a truncation marker."""
    def judged(output: str) -> tuple[float, dict[str, Any]]:
        return 0.5, {"reason": "ok", "verdicts": ["yes"] * 50_000, "model": "judge-1"}

    url = f"sqlite:///{tmp_path}/meta.sqlite"
    with Session(url, max_payload_bytes=100_000) as session:
        record = session.ingest(_record(), [Feedback(judged).on_output()])
        assert record.wait_for_feedback_results(timeout=20)["judged"].result == 0.5
    with Session(url) as reader:
        stored = reader.get_record(record.record_id)
    assert stored is not None
    result = stored.feedback_results["judged"]
    assert (result.result, result.explanation) == (0.5, "ok")
    [call] = result.calls
    assert call.metadata[TRUNCATED_KEY] is True
    assert call.metadata["original_bytes"] > 100_000
    assert '"verdicts":["yes"' in call.metadata["preview"]


# ------------------------------------------------- deferred feedbacks on what was cut
def test_a_deferred_feedback_on_a_value_the_serializer_cut_is_skipped(
        tmp_path: Path) -> None:
    """Nesting past 200 levels (or an int past 4,300 digits) is stored as a description:
    deferred feedbacks scored it — 200.0 for a depth of 500 — as `done`."""
    depth = Feedback(depth_of).on_input()
    length = Feedback(question_length).on_input()
    with Session(f"sqlite:///{tmp_path}/cut.sqlite", feedback_mode="deferred") as app:
        deep = app.ingest(_record(input=_nested(300)), [depth])
        shallow = app.ingest(_record(input=_nested(50)), [depth])
        giant = app.ingest(_record(input={"question": "How big?", "n": GIANT}), [length])
        big = app.ingest(_record(input={"question": "How big?", "n": 2 ** 70}), [length])
        assert app.flush(10)
        assert app.resume_pending(timeout=10) == 4
        deep_result = deep.wait_for_feedback_results(timeout=10)[depth]
        shallow_result = shallow.wait_for_feedback_results(timeout=10)[depth]
        giant_result = giant.wait_for_feedback_results(timeout=10)[length]
        big_result = big.wait_for_feedback_results(timeout=10)[length]
    assert deep_result.status is FeedbackStatus.SKIPPED, deep_result
    assert deep_result.result is None
    assert "truncated when the record was stored" in (deep_result.error or "")
    assert "nested over 200 levels" in (deep_result.error or "")
    assert "max_payload_bytes" not in (deep_result.error or "")  # (not a matter of size)
    assert giant_result.status is FeedbackStatus.SKIPPED, giant_result
    assert "stored as hex" in (giant_result.error or "")
    assert (shallow_result.status, shallow_result.result) == (FeedbackStatus.DONE, 50.0)
    assert (big_result.status, big_result.result) == (FeedbackStatus.DONE, 8.0)


def test_a_broken_repr_is_marked_as_cut() -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    back = _serialize.loads(_serialize.dumps({"ok": 1, "odd": Broken()}))
    assert back["ok"] == 1
    assert back["odd"][TRUNCATED_KEY] is True
    assert "RuntimeError" in (_rows.truncation(back) or "")


# ------------------------------------------------------------------- a big answer's cost
def test_a_big_answer_is_cut_without_being_encoded_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 50 MB answer (in the output and in two spans) was encoded whole several times —
    ~250 MB of JSON, each encoding holding the GIL, the app's other threads stalled up to
    200 ms — to keep a prefix: no single encoding is now much over the kept size."""
    big = "0123456789abcdef\n" * 600_000  # (10 MB, with characters JSON escapes)
    spans = [Span("1", None, "root", "chain", 1.0, end_time=2.0, inputs="q", outputs=big),
             Span("2", "1", "gen", "chain", 1.0, end_time=2.0, inputs="q", outputs=big)]
    record = _record(output=big, spans=spans)
    longest: list[int] = []
    real = _serialize.orjson

    class Measured:
        Fragment = real.Fragment
        JSONEncodeError = real.JSONEncodeError
        loads = staticmethod(real.loads)

        @staticmethod
        def dumps(*args: Any, **kw: Any) -> bytes:
            data = real.dumps(*args, **kw)
            longest.append(len(data))
            return data

    monkeypatch.setattr(_serialize, "orjson", Measured)
    row = _rows.record_row(record, max_bytes=100_000, compress_spans=True)
    monkeypatch.undo()
    assert max(longest) < 2_000_000, max(longest)
    whole = len(real.dumps(big))
    output = _serialize.loads(row["output_json"])
    assert output[TRUNCATED_KEY] is True
    assert output["original_bytes"] == whole  # (measured exactly, a piece at a time)
    assert big.startswith(output["preview"])
    with Session(f"sqlite:///{tmp_path}/big.sqlite", max_payload_bytes=100_000) as session:
        session.ingest(record, [])
        assert session.flush(30)
        stored = session.get_record(record.record_id)
    assert stored is not None
    assert [s.name for s in stored.spans] == ["root", "gen"]
    for span in stored.spans:
        assert span.inputs == "q"
        assert f"{whole} bytes" in (_rows.truncation(span.outputs) or "")
