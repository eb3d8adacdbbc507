"""LangChain recording: one root invocation gives exactly one record with its full span tree."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from uuid import UUID

import pytest

pytest.importorskip("langchain_core")

from langchain_core.language_models import FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import (
    RunnableGenerator,
    RunnableLambda,
    RunnableParallel,
    RunnablePassthrough,
    chain,
)
from langchain_core.tools import tool

from scrutiny import Record, RecordingError, RecordStatus, Session, Span
from scrutiny.core._records import MAX_APP_LABEL_BYTES
from scrutiny.integrations.langchain import ChainRecorder, ScrutinyCallbackHandler

QUESTION = "What is the capital of France?"
ANSWER = "Paris is the capital of France."
CORPUS = ("Paris is the capital of France.", "Berlin is in Germany.", "Rome is in Italy.")


# ---------------------------------------------------------------------------- helpers
def check_tree(record: Record) -> dict[str, Span]:
    """The span tree is one tree rooted at the root run; returns spans by id."""
    by_id = {s.span_id: s for s in record.spans}
    assert len(by_id) == len(record.spans), "duplicate span ids"
    roots = [s for s in record.spans if s.parent_id is None]
    assert len(roots) == 1, f"expected one root span, got {[s.name for s in roots]}"
    assert roots[0].span_id == record.root_run_id
    for s in record.spans:
        assert s.parent_id is None or s.parent_id in by_id, f"{s.name} has a foreign parent"
        assert s.end_time is not None, f"{s.name} never ended"
    return by_id


def ancestors(span: Span, by_id: dict[str, Span]) -> list[Span]:
    out = []
    while span.parent_id is not None:
        span = by_id[span.parent_id]
        out.append(span)
    return out


def one(record: Record, kind: str) -> Span:
    spans = record.spans_of_kind(kind)
    assert len(spans) == 1, f"expected one {kind} span, got {len(spans)}"
    return spans[0]


def stored_count(session: Session) -> int:
    df, _ = session.get_records_and_feedback()
    return len(df)


def prompt_model_parser(responses: list[str]) -> Any:
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    return prompt | FakeListChatModel(responses=responses) | StrOutputParser()


# ---------------------------------------------------------------------------- invoke
def test_invoke_records_one_record_with_the_full_span_tree(
        session: Session, make_retrieval_chain: Callable[..., Any]) -> None:
    rag = make_retrieval_chain([ANSWER], texts=CORPUS)
    recorder = ChainRecorder(rag, app_name="qa", session=session)
    with recorder as recording:
        answer = rag.invoke(QUESTION)

    assert answer == ANSWER
    record = recording.get()
    by_id = check_tree(record)
    kinds = {s.kind for s in record.spans}
    assert {"chain", "retriever", "prompt", "chat_model", "parser"} <= kinds
    root = record.root_span()
    assert root is not None
    assert root.kind == "chain"
    # prompt, model and parser are steps of the root sequence; the retriever sits deeper
    for kind in ("prompt", "chat_model", "parser"):
        assert one(record, kind).parent_id == root.span_id
    retriever = one(record, "retriever")
    assert root in ancestors(retriever, by_id)
    assert len(ancestors(retriever, by_id)) >= 2  # parallel map -> retriever sequence
    assert one(record, "chat_model").model == "fake-list-chat-model"

    assert record.status is RecordStatus.OK
    assert record.input == QUESTION
    assert record.output == ANSWER
    assert len(record.contexts) == 2
    assert set(record.contexts) <= set(CORPUS)
    assert record.framework == "langchain"
    assert UUID(record.root_run_id or "")  # a real LangChain run id

    stored = session.get_record(record.record_id)
    assert stored is not None
    assert stored.output == ANSWER
    assert len(stored.spans) == len(record.spans)
    assert stored.contexts == record.contexts


def test_token_usage_is_none_when_the_model_reports_none(
        session: Session, make_retrieval_chain: Callable[..., Any]) -> None:
    rag = make_retrieval_chain([ANSWER])
    with ChainRecorder(rag, app_name="qa", session=session) as recording:
        rag.invoke(QUESTION)
    record = recording.get()
    assert record.usage is None
    assert one(record, "chat_model").usage is None
    df, _ = session.get_records_and_feedback()
    assert df["total_tokens"].isna().all()


def test_token_usage_reported_by_the_model_is_summed_over_calls(session: Session) -> None:
    model = GenericFakeChatModel(messages=iter([
        AIMessage(content="a", usage_metadata={
            "input_tokens": 3, "output_tokens": 2, "total_tokens": 5}),
        AIMessage(content="b", usage_metadata={
            "input_tokens": 7, "output_tokens": 4, "total_tokens": 11}),
    ]))
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    first = prompt | model | StrOutputParser()
    app: Any = RunnableLambda(lambda q: {"question": q}) | first | RunnableLambda(
        lambda a: {"question": a}) | first

    with ChainRecorder(app, app_name="usage", session=session) as recording:
        assert app.invoke("q") == "b"

    record = recording.get()
    models = record.spans_of_kind("chat_model")
    assert len(models) == 2
    assert [m.usage.total_tokens for m in models if m.usage] == [5, 11]
    assert record.usage is not None
    assert (record.usage.prompt_tokens, record.usage.completion_tokens,
            record.usage.total_tokens) == (10, 6, 16)
    df, _ = session.get_records_and_feedback()
    assert df["total_tokens"].tolist() == [16]


def test_an_app_with_a_long_name_of_its_own_is_recorded_under_a_short_one(
        session: Session) -> None:
    """A `RunnableParallel` of 300 keys names every key: the recorder refused to be
    created, as its name (the default app name) was thousands of characters long, and
    told the user to shorten the version they had left at its default."""
    def parallel(keys: int) -> Any:
        return RunnableParallel({f"key_{i}": RunnableLambda(lambda x: x) for i in range(keys)})

    app = parallel(300)
    with ChainRecorder(app, session=session) as recording:
        app.invoke("x")
    record = recording.get()
    name = record.app_name
    assert len(name.encode()) + len("v1") <= MAX_APP_LABEL_BYTES
    assert name.startswith("RunnableParallel<key_0,key_1,")
    assert ChainRecorder(parallel(300), session=session).app_name == name  # (every time)
    assert ChainRecorder(parallel(301), session=session).app_name != name
    # (a name that can be stored stays the name its records had)
    assert ChainRecorder(parallel(60), session=session).app_name == parallel(60).get_name()
    assert ChainRecorder(parallel(3), session=session).app_name == parallel(3).get_name()
    assert session.flush(10)
    assert stored_count(session) == 1

async def test_ainvoke_records_one_record(
        session: Session, make_retrieval_chain: Callable[..., Any]) -> None:
    rag = make_retrieval_chain([ANSWER])
    with ChainRecorder(rag, app_name="qa", session=session) as recording:
        answer = await rag.ainvoke(QUESTION)

    assert answer == ANSWER
    record = recording.get()
    check_tree(record)
    assert {"chain", "retriever", "prompt", "chat_model", "parser"} <= {
        s.kind for s in record.spans}
    assert (record.input, record.output) == (QUESTION, ANSWER)
    assert len(record.contexts) == 2


async def test_async_with_block_records(session: Session,
                                        make_retrieval_chain: Callable[..., Any]) -> None:
    rag = make_retrieval_chain([ANSWER])
    async with ChainRecorder(rag, app_name="qa", session=session) as recording:
        await rag.ainvoke(QUESTION)
    assert recording.get().output == ANSWER


# ---------------------------------------------------------------------------- batch
QUESTIONS = ["Capital of France?", "Capital of Germany?", "Capital of Italy?"]


def _check_siblings(records: list[Record], answers: dict[str, str]) -> None:
    assert len(records) == 3
    assert sorted(r.input for r in records) == sorted(QUESTIONS)
    assert len({r.root_run_id for r in records}) == 3
    span_ids = [s.span_id for r in records for s in r.spans]
    assert len(span_ids) == len(set(span_ids)), "a span was attributed to two records"
    for r in records:
        check_tree(r)
        assert r.output == answers[r.input]
        prompt = one(r, "prompt")
        assert r.input in str(prompt.inputs)  # the record's own prompt, not a sibling's


def test_batch_gives_sibling_records(session: Session,
                                     make_retrieval_chain: Callable[..., Any]) -> None:
    rag = make_retrieval_chain(["Paris.", "Berlin.", "Rome."])
    with ChainRecorder(rag, app_name="qa", session=session) as recording:
        outputs = rag.batch(QUESTIONS)
    _check_siblings(recording.records, dict(zip(QUESTIONS, outputs, strict=True)))
    assert stored_count(session) == 3


async def test_abatch_gives_sibling_records(session: Session,
                                            make_retrieval_chain: Callable[..., Any]) -> None:
    rag = make_retrieval_chain(["Paris.", "Berlin.", "Rome."])
    with ChainRecorder(rag, app_name="qa", session=session) as recording:
        outputs = await rag.abatch(QUESTIONS, config={"max_concurrency": 2})
    _check_siblings(recording.records, dict(zip(QUESTIONS, outputs, strict=True)))
    assert stored_count(session) == 3


# ---------------------------------------------------------------------------- streaming
def test_stream_fully_consumed_gives_one_record_with_the_full_output(
        session: Session, make_retrieval_chain: Callable[..., Any]) -> None:
    rag = make_retrieval_chain([ANSWER])
    with ChainRecorder(rag, app_name="qa", session=session) as recording:
        chunks = list(rag.stream(QUESTION))

    assert len(chunks) > 1
    assert "".join(chunks) == ANSWER
    record = recording.get()
    check_tree(record)
    assert record.status is RecordStatus.OK
    assert record.output == ANSWER
    assert record.input == QUESTION
    assert len(record.contexts) == 2


async def test_astream_fully_consumed_gives_one_record_with_the_full_output(
        session: Session, make_retrieval_chain: Callable[..., Any]) -> None:
    rag = make_retrieval_chain([ANSWER])
    with ChainRecorder(rag, app_name="qa", session=session) as recording:
        chunks = [c async for c in rag.astream(QUESTION)]

    assert "".join(chunks) == ANSWER
    record = recording.get()
    check_tree(record)
    assert record.status is RecordStatus.OK
    assert (record.input, record.output) == (QUESTION, ANSWER)


async def test_a_stream_called_in_the_block_and_read_after_it_says_what_to_do(
        session: Session, make_retrieval_chain: Callable[..., Any]) -> None:
    """`stream = chain.stream(x)` in the block, read after it (a StreamingResponse): the
    stream only runs as it is read, outside the block, so no record is made — and
    `recording.get()` told the user to "call the chain inside the `with` block", which they
    had done. It says what happened and what to do; doing it records the stream."""
    rag = make_retrieval_chain([ANSWER] * 4)
    recorder = ChainRecorder(rag, app_name="qa", session=session)
    with recorder as sync_block:
        stream = rag.stream(QUESTION)
    assert "".join(stream) == ANSWER
    async with recorder as async_block:
        astream = rag.astream(QUESTION)
    assert "".join([c async for c in astream]) == ANSWER
    for recording in (sync_block, async_block):
        with pytest.raises(RecordingError, match="runs only as it is read") as raised:
            recording.get()
        assert "config={'callbacks': [recorder]} to stream()/astream()" in str(
            raised.value)
    with recorder:
        stream = rag.stream(QUESTION, config={"callbacks": [recorder.handler]})
    async with recorder:
        astream = rag.astream(QUESTION, config={"callbacks": [recorder.handler]})
    assert "".join(stream) == "".join([c async for c in astream]) == ANSWER
    assert [r.output for r in recorder.handler.records] == [ANSWER, ANSWER]
    assert stored_count(session) == 2

def test_stream_stopped_early_gives_one_cancelled_record(
        session: Session, make_retrieval_chain: Callable[..., Any]) -> None:
    rag = make_retrieval_chain([ANSWER])
    got: list[str] = []
    with ChainRecorder(rag, app_name="qa", session=session) as recording:
        stream = rag.stream(QUESTION)
        for chunk in stream:
            got.append(chunk)
            if len(got) == 3:
                break
        stream.close()

    assert "".join(got) == ANSWER[:3]  # the caller's tokens are untouched
    record = recording.get()
    assert record.status is RecordStatus.CANCELLED
    assert record.error
    # exactly what reached the caller (LangChain's own output of the run lacks the last
    # chunk of a sync stream)
    assert record.output == "".join(got)
    assert stored_count(session) == 1
    df, _ = session.get_records_and_feedback()
    assert df.loc[0, "status"] == "cancelled"


async def test_astream_stopped_early_gives_one_cancelled_record(
        session: Session, make_retrieval_chain: Callable[..., Any]) -> None:
    rag = make_retrieval_chain([ANSWER])
    got: list[str] = []
    # LangChain ends the root run of an async stream closed early only when the event loop
    # finalizes its inner generators; `async with` gives the loop those turns on exit.
    async with ChainRecorder(rag, app_name="qa", session=session) as recording:
        stream = rag.astream(QUESTION)
        async for chunk in stream:
            got.append(chunk)
            break
        await stream.aclose()

    assert got == [ANSWER[0]]
    record = recording.get()
    assert record.status is RecordStatus.CANCELLED
    assert record.output is None or (ANSWER.startswith(record.output)
                                     and record.output != ANSWER)
    assert stored_count(session) == 1


async def test_a_stream_stopped_early_keeps_only_the_answer_models_tokens(
        session: Session) -> None:
    """A chain that rewrites the question with one model and answers with another: the
    rewrite's tokens were glued in front of the partial answer the consumer saw."""
    rewrite = FakeListChatModel(responses=["REWRITTEN QUESTION "] * 3)
    answer = FakeListChatModel(responses=["final answer text"] * 3)
    chain = (ChatPromptTemplate.from_template("rewrite {q}") | rewrite | StrOutputParser()
             | ChatPromptTemplate.from_template("answer {text}") | answer | StrOutputParser())
    async with ChainRecorder(chain, app_name="two", session=session) as recording:
        stream = chain.astream({"q": "x"})
        seen = []
        async for chunk in stream:
            seen.append(chunk)
            if len(seen) == 4:
                break
        await stream.aclose()  # type: ignore[attr-defined]
    record = recording.get()
    assert record.status is RecordStatus.CANCELLED
    assert record.output == "".join(seen) == "fina"
    with ChainRecorder(chain, app_name="two", session=session) as recording:
        it = chain.stream({"q": "x"})
        sync_seen = [next(it) for _ in range(4)]
        it.close()  # type: ignore[attr-defined]
    assert recording.get().output == "".join(sync_seen) == "fina"


def _upper(chunks: Any) -> Any:
    for chunk in chunks:
        yield chunk.upper()


async def _aupper(chunks: Any) -> Any:
    async for chunk in chunks:
        yield chunk.upper()


def _letters(texts: Any) -> Any:
    for text in texts:
        yield from text


async def _aletters(texts: Any) -> Any:
    async for text in texts:
        for letter in text:
            yield letter


@pytest.mark.parametrize("shape", ["upper_after_the_model", "no_model"])
@pytest.mark.parametrize("call", ["stream", "astream"])
async def test_a_stream_stopped_early_keeps_what_its_caller_received(
        session: Session, shape: str, call: str) -> None:
    """The model's tokens stood in for the chunk LangChain leaves out of a stopped stream's
    output: with a step after the model that changes the text, the record held text the
    caller never saw (the model's lower case; one chunk short once cased), and without a
    model, it lacked the last chunk the caller received."""
    if shape == "no_model":
        chain: Any = RunnableLambda(lambda q: "abcdef", name="text") | RunnableGenerator(
            _letters, _aletters, name="letters")
    else:
        chain = (ChatPromptTemplate.from_template("Q {q}")
                 | GenericFakeChatModel(messages=iter([AIMessage(content="one two three")]))
                 | StrOutputParser() | RunnableGenerator(_upper, _aupper, name="upper"))
    seen: list[str] = []
    async with ChainRecorder(chain, app_name="stopped", session=session) as recording:
        if call == "stream":
            it = chain.stream({"q": "x"})
            seen = [next(it) for _ in range(3)]
            it.close()
        else:
            ait = chain.astream({"q": "x"})
            seen = [await ait.__anext__() for _ in range(3)]
            await ait.aclose()
    record = recording.get()
    assert record.status is RecordStatus.CANCELLED
    assert record.output == "".join(seen)


async def test_astream_cancelled_mid_stream_gives_one_cancelled_record(
        session: Session) -> None:
    app = prompt_model_parser([ANSWER])
    app.steps[1].sleep = 0.02
    first = asyncio.Event()
    got: list[str] = []

    async def consume() -> None:
        async for chunk in app.astream({"question": QUESTION}):
            got.append(chunk)
            first.set()

    with ChainRecorder(app, app_name="qa", session=session) as recording:
        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert got
    assert ANSWER.startswith("".join(got))
    assert "".join(got) != ANSWER
    record = recording.get()
    assert record.status is RecordStatus.CANCELLED
    assert record.output is None or ANSWER.startswith(record.output)
    assert stored_count(session) == 1


# ---------------------------------------------------------------------------- shapes
def test_an_input_the_app_reuses_for_its_next_call_is_recorded_as_it_was(
        session: Session) -> None:
    """The record is assembled off the app's thread, later: an app that fills one request
    dict per call (and appends to its chat history) changed what had been recorded — and
    judged — for the calls before."""
    from scrutiny import Feedback

    chain = RunnableLambda(lambda x: f"answer to {x['question']}")
    matches = Feedback(lambda question, answer: float(answer == f"answer to {question}"),
                       name="matches").on_input_output()
    recorder = ChainRecorder(chain, app_name="reuse", feedbacks=[matches], session=session)
    payload: dict[str, Any] = {"question": "", "history": []}
    records = []
    for i in range(10):
        payload["question"] = f"q{i}"
        with recorder as recording:
            chain.invoke(payload)
        payload["history"].append(f"turn {i}")
        records.append(recording.get())
    for i, record in enumerate(records):
        assert record.input == f"q{i}"
        assert record.output == f"answer to q{i}"
        assert record.spans[0].inputs["history"] == [f"turn {j}" for j in range(i)]
        assert record.wait_for_feedback_results(timeout=10)[matches].result == 1.0


def test_nested_chains_nest_their_spans(session: Session) -> None:
    inner = prompt_model_parser(["inner answer"]).with_config(run_name="inner")
    outer = (RunnableLambda(lambda q: {"question": q}).with_config(run_name="pre")
             | inner
             | RunnableLambda(lambda a: a.upper()).with_config(run_name="post"))
    with ChainRecorder(outer, app_name="nested", session=session) as recording:
        assert outer.invoke("hi") == "INNER ANSWER"

    record = recording.get()
    by_id = check_tree(record)
    root = record.root_span()
    assert root is not None
    names = {s.name: s for s in record.spans}
    assert {"pre", "inner", "post"} <= names.keys()
    for name in ("pre", "inner", "post"):
        assert names[name].parent_id == root.span_id
    model = one(record, "chat_model")
    assert [a.name for a in ancestors(model, by_id)][:1] == ["inner"]
    assert record.output == "INNER ANSWER"
    assert [depth for depth, s in record.walk() if s is model] == [2]


def test_runnable_parallel_branches_are_children_of_the_parallel_span(
        session: Session) -> None:
    par = RunnableParallel(
        upper=RunnableLambda(lambda s: s.upper()).with_config(run_name="upper"),
        answer=RunnableLambda(lambda s: {"question": s}) | prompt_model_parser(["42"]),
        same=RunnablePassthrough(),
    )
    with ChainRecorder(par, app_name="par", session=session) as recording:
        result = par.invoke("x")

    assert result == {"upper": "X", "answer": "42", "same": "x"}
    record = recording.get()
    by_id = check_tree(record)
    root = record.root_span()
    assert root is not None
    assert root.outputs == result
    assert {s.name for s in record.children(root)} >= {"upper", "RunnablePassthrough"}
    assert len(record.children(root)) == 3
    answer_branch = ancestors(one(record, "chat_model"), by_id)[-2]
    assert answer_branch.parent_id == root.span_id
    assert record.output == "42"  # the main output of a mapping is its "answer" value


def test_chain_decorator_and_lambda_spans_nest(session: Session) -> None:
    answerer = prompt_model_parser(["from the model"])

    @chain
    def my_app(question: str) -> str:
        shout = RunnableLambda(lambda s: s + "!").with_config(run_name="shout")
        return str(shout.invoke(answerer.invoke({"question": question})))

    with ChainRecorder(my_app, app_name="deco", session=session) as recording:
        assert my_app.invoke("q") == "from the model!"

    record = recording.get()
    by_id = check_tree(record)
    root = record.root_span()
    assert root is not None
    assert root.name == "my_app"
    shout = next(s for s in record.spans if s.name == "shout")
    assert shout.parent_id == root.span_id
    assert root in ancestors(one(record, "chat_model"), by_id)
    assert record.input == "q"
    assert record.output == "from the model!"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_each_step_keeps_its_values_as_they_were_though_the_app_changes_them(
        session: Session) -> None:
    """A state dict passed along and changed in place (as state-passing apps do): every
    step showed the last state, including what the app appended after the call."""
    def step1(state: dict[str, Any]) -> dict[str, Any]:
        state["history"].append("step1")
        state["n"] = 1
        return state

    def step2(state: dict[str, Any]) -> dict[str, Any]:
        state["history"].append("step2")
        state["n"] = 2
        return {"answer": "done", "state": state}

    chain = RunnableLambda(step1, name="step1") | RunnableLambda(step2, name="step2")
    history = ["user: hi"]
    with ChainRecorder(chain, app_name="state", session=session) as recording:
        chain.invoke({"question": "q", "history": history})
    history.append("appended after the call")
    assert session.flush(10)
    stored = session.get_record(recording.get().record_id)
    assert stored is not None
    spans = {sp.name: sp for sp in stored.spans}
    assert spans["step1"].inputs == {"question": "q", "history": ["user: hi"]}
    assert spans["step1"].outputs["history"] == ["user: hi", "step1"]
    assert spans["step2"].inputs["n"] == 1
    root = stored.root_span()
    assert root is not None
    assert root.outputs["state"]["history"] == ["user: hi", "step1", "step2"]


def test_tool_called_inside_a_chain_is_a_child_tool_span(session: Session) -> None:
    app: Any = RunnableLambda(lambda d: {"a": d["x"], "b": 2}).with_config(
        run_name="args") | add
    with ChainRecorder(app, app_name="tools", session=session) as recording:
        assert app.invoke({"x": 40}) == 42

    record = recording.get()
    check_tree(record)
    tool_span = one(record, "tool")
    assert tool_span.name == "add"
    assert tool_span.parent_id == record.root_run_id
    assert tool_span.outputs == 42
    assert record.output == 42


def test_tool_called_alone_is_a_root_record(session: Session) -> None:
    with ChainRecorder(add, app_name="tools", session=session) as recording:
        assert add.invoke({"a": 1, "b": 2}) == 3
    record = recording.get()
    root = record.root_span()
    assert root is not None
    assert root.kind == "tool"
    assert record.output == 3


def test_a_models_tool_calls_are_recorded_on_its_span_and_in_the_output(
        session: Session) -> None:
    """An agent step that only asks for a tool has no text: its span and its record held
    '' and the call itself was stored nowhere."""
    asks = AIMessage(content="", tool_calls=[
        {"name": "get_weather", "args": {"city": "Dublin"}, "id": "call_1"}])
    talks = AIMessage(content="Let me check both.", tool_calls=[
        {"name": "get_weather", "args": {"city": "Cork"}, "id": "call_2"},
        {"name": "get_time", "args": {"tz": "Europe/Dublin"}, "id": "call_3"}])
    model = GenericFakeChatModel(messages=iter([asks, talks]))
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | model
    with ChainRecorder(chain, app_name="agent", session=session) as recording:
        assert chain.invoke({"q": "weather in Dublin?"}).tool_calls
        assert chain.invoke({"q": "weather in Cork, and the time?"}).tool_calls
    first, second = recording.records
    span = one(first, "chat_model")
    assert span.outputs == {"text": "", "tool_calls": [
        {"name": "get_weather", "args": {"city": "Dublin"}, "id": "call_1"}]}
    assert first.output == '[tool call] get_weather({"city": "Dublin"})'
    assert second.output == ("Let me check both.\n"
                             '[tool call] get_weather({"city": "Cork"})\n'
                             '[tool call] get_time({"tz": "Europe/Dublin"})')
    assert session.flush(10)
    stored = session.get_record(first.record_id)
    assert stored is not None
    assert one(stored, "chat_model").outputs == span.outputs
    assert stored.output == first.output


# ---------------------------------------------------------------------------- errors
class AppError(RuntimeError):
    pass


async def test_a_branch_that_outlives_a_failed_sibling_adds_no_record(
        session: Session) -> None:
    """A parallel step fails while another branch still runs: that branch was marked
    'the consumer stopped the stream early' (no stream was involved), and the runs it
    started afterwards became a second record of their own after the block had closed."""
    release, finished = asyncio.Event(), asyncio.Event()
    child = RunnableLambda(lambda x: f"child({x})", name="child")

    async def slow(x: str, config: Any) -> str:
        await release.wait()
        out = await child.ainvoke(x, config)
        finished.set()
        return str(out)

    def bad(x: str) -> str:
        raise AppError("branch failed")

    par = RunnableParallel(a=RunnableLambda(slow, name="slow"), b=RunnableLambda(bad))
    async with ChainRecorder(par, app_name="outlived", session=session) as recording:
        with pytest.raises(AppError):
            await par.ainvoke("x")
    release.set()
    await asyncio.wait_for(finished.wait(), 10)
    assert len(recording.records) == 1
    record = recording.records[0]
    assert record.status is RecordStatus.ERROR
    slow_span = next(sp for sp in record.spans if sp.name == "slow")
    assert "still running when another step failed" in (slow_span.error or "")
    assert session.flush(10)
    df, _ = session.get_records_and_feedback()
    assert len(df) == 1


def test_exception_reaches_the_caller_unchanged_and_an_error_record_is_stored(
        session: Session) -> None:
    error = AppError("the retriever is down")

    def fail(_: Any) -> str:
        raise error

    app = prompt_model_parser(["never"]) | RunnableLambda(fail)
    with ChainRecorder(app, app_name="err", session=session) as recording, \
            pytest.raises(AppError) as caught:
        app.invoke({"question": "q"})

    assert caught.value is error
    record = recording.get()
    assert record.status is RecordStatus.ERROR
    assert record.error is not None
    assert "AppError" in record.error
    assert "the retriever is down" in record.error
    assert record.output is None
    failing = [s for s in record.spans if s.error]
    assert {s.name for s in failing} >= {"fail"}
    df, _ = session.get_records_and_feedback()
    assert list(df["status"]) == ["error"]
    assert "the retriever is down" in str(df.loc[0, "error"])


async def test_async_exception_reaches_the_caller_unchanged(session: Session) -> None:
    error = AppError("async boom")

    async def fail(_: Any) -> str:
        raise error

    app = RunnableLambda(fail)
    with ChainRecorder(app, app_name="err", session=session) as recording, \
            pytest.raises(AppError) as caught:
        await app.ainvoke("q")
    assert caught.value is error
    assert recording.get().status is RecordStatus.ERROR


# ---------------------------------------------------------------------------- scoping
def test_calls_outside_the_block_are_not_recorded(session: Session) -> None:
    app = prompt_model_parser(["a"])
    recorder = ChainRecorder(app, app_name="scope", session=session)
    app.invoke({"question": "before"})
    with recorder as recording:
        app.invoke({"question": "inside"})
    app.invoke({"question": "after"})

    assert [r.input for r in recording.records] == ["inside"]
    assert [r.input for r in recorder.handler.records] == ["inside"]
    df, _ = session.get_records_and_feedback()
    assert list(df["input"]) == ["inside"]


def test_the_recorder_itself_passed_as_a_callback_records_and_never_breaks_the_call(
        session: Session) -> None:
    """`config={"callbacks": [recorder]}` (the recorder, not `recorder.handler`) failed the
    app's call with LangChain's AttributeError ('ChainRecorder' object has no attribute
    'raise_error'). The recorder is the handler: the call is recorded, once, also inside a
    block of the same recorder."""
    app = prompt_model_parser(["a", "b"])
    recorder = ChainRecorder(app, app_name="cfg", session=session)
    assert recorder.handler is recorder
    assert app.invoke({"question": "by config"}, config={"callbacks": [recorder]}) == "a"
    with recorder as recording:
        assert app.invoke({"question": "both"}, config={"callbacks": [recorder]}) == "b"
    assert [r.input for r in recorder.records] == ["by config", "both"]
    assert [r.input for r in recording.records] == ["both"]
    for record in recorder.records:
        assert len(record.spans) == 4  # sequence, prompt, model, parser: each once
    assert stored_count(session) == 2


def test_consecutive_top_level_runs_are_siblings(session: Session) -> None:
    app = prompt_model_parser(["one", "two", "three"])
    with ChainRecorder(app, app_name="seq", session=session) as recording:
        outputs = [app.invoke({"question": f"q{i}"}) for i in range(3)]

    records = recording.records
    assert [r.input for r in records] == ["q0", "q1", "q2"]
    assert [r.output for r in records] == outputs == ["one", "two", "three"]
    for r in records:
        check_tree(r)
        assert len(r.spans) == 4  # sequence, prompt, model, parser: nothing leaked in
    assert len({r.root_run_id for r in records}) == 3


def test_nested_with_blocks_of_one_recorder_give_one_record(session: Session) -> None:
    app = prompt_model_parser(["a"])
    recorder = ChainRecorder(app, app_name="re", session=session)
    with recorder as outer:
        with recorder as inner:
            app.invoke({"question": "q"})
        app.invoke({"question": "q2"})
    assert [r.input for r in inner.records] == ["q"]
    assert [r.input for r in outer.records] == ["q2"]
    assert stored_count(session) == 2


def test_a_block_opened_inside_a_recorded_call_says_where_its_call_went(
        session: Session) -> None:
    """A chain called by a chain, each in a block of one recorder: the inner call is part
    of the outer record, and the inner block's get() said 'call the chain inside the
    with block' — though it had been."""
    inner = RunnableLambda(lambda x: f"inner({x})", name="inner")
    recorder = ChainRecorder(inner, app_name="same", session=session)
    errors: list[str] = []

    def outer_step(x: str) -> str:
        with recorder as nested:
            out = inner.invoke(x)
        try:
            nested.get()
        except RecordingError as exc:
            errors.append(str(exc))
        return str(out)

    outer = RunnableLambda(outer_step, name="outer")
    with recorder as recording:
        outer.invoke("z")
    assert [r.output for r in recording.records] == ["inner(z)"]
    assert len(errors) == 1
    assert "part of that call's record, in the outer recording" in errors[0]


@pytest.mark.parametrize("how", ["per_call", "context", "both", "construction",
                                 "construction_and_context"])
def test_handler_attachment_never_duplicates_records(session: Session, how: str) -> None:
    app = prompt_model_parser(["a"])
    recorder = ChainRecorder(app, app_name="dup", session=session)
    handler = recorder.handler
    config = {"callbacks": [handler]} if how in ("per_call", "both") else None
    target = app.with_config(callbacks=[handler]) if how.startswith("construction") else app
    if how in ("context", "both", "construction_and_context"):
        with recorder as recording:
            target.invoke({"question": "q"}, config=config)
        assert len(recording.records) == 1
    else:
        target.invoke({"question": "q"}, config=config)

    assert [r.input for r in handler.records] == ["q"]
    record = handler.records[0]
    check_tree(record)
    assert len(record.spans) == 4
    assert stored_count(session) == 1


def test_a_standalone_handler_records_per_call(session: Session) -> None:
    app = prompt_model_parser(["a"])
    handler = ScrutinyCallbackHandler("manual", "v2", session=session)
    app.invoke({"question": "q"}, config={"callbacks": [handler]})
    app.invoke({"question": "not recorded"})
    assert [r.input for r in handler.records] == ["q"]
    df, _ = session.get_records_and_feedback()
    assert list(df["app_id"]) == ["manual:v2"]


# ---------------------------------------------------------------------------- more shapes
def test_batch_with_a_failing_input_gives_one_error_record_among_siblings(
        session: Session) -> None:
    def maybe_fail(q: str) -> str:
        if q == "bad":
            raise AppError("bad input")
        return q.upper()

    app = RunnableLambda(maybe_fail)
    with ChainRecorder(app, app_name="b", session=session) as recording:
        out = app.batch(["a", "bad", "c"], return_exceptions=True)
    assert out[0] == "A"
    assert isinstance(out[1], AppError)
    assert out[2] == "C"
    by_input = {r.input: r for r in recording.records}
    assert set(by_input) == {"a", "bad", "c"}
    assert by_input["bad"].status is RecordStatus.ERROR
    assert "bad input" in (by_input["bad"].error or "")
    assert by_input["a"].status is by_input["c"].status is RecordStatus.OK


def test_a_failure_handled_by_a_fallback_keeps_the_record_ok(session: Session) -> None:
    def primary(q: str) -> str:
        raise AppError("primary down")

    app = RunnableLambda(primary).with_fallbacks([RunnableLambda(lambda q: "fallback")])
    with ChainRecorder(app, app_name="fb", session=session) as recording:
        assert app.invoke("q") == "fallback"
    record = recording.get()
    check_tree(record)
    assert record.status is RecordStatus.OK
    assert record.output == "fallback"
    assert any(s.error and "primary down" in s.error for s in record.spans)


async def test_sync_steps_run_in_an_executor_stay_attached(session: Session) -> None:
    model_chain = prompt_model_parser(["deep"])

    def sync_step(q: str) -> str:  # LangChain runs it in a thread under ainvoke
        return str(model_chain.invoke({"question": q}))

    app = RunnableLambda(sync_step).with_config(run_name="sync_step")
    with ChainRecorder(app, app_name="exec", session=session) as recording:
        assert await app.ainvoke("q") == "deep"
    record = recording.get()
    by_id = check_tree(record)
    assert record.root_span() in ancestors(one(record, "chat_model"), by_id)
    assert stored_count(session) == 1


def test_streaming_a_parallel_map_fully_is_not_cancelled(session: Session) -> None:
    par = RunnableParallel(a=prompt_model_parser(["alpha"]),
                           b=RunnableLambda(lambda d: d["question"]))
    with ChainRecorder(par, app_name="ps", session=session) as recording:
        chunks = list(par.stream({"question": "q"}))
    assert chunks
    record = recording.get()
    check_tree(record)
    assert record.status is RecordStatus.OK
    assert record.root_span().outputs == {"a": "alpha", "b": "q"}  # type: ignore[union-attr]


async def test_astream_events_fully_consumed_gives_one_record(
        session: Session, make_retrieval_chain: Callable[..., Any]) -> None:
    rag = make_retrieval_chain([ANSWER])
    with ChainRecorder(rag, app_name="ev", session=session) as recording:
        events = [e async for e in rag.astream_events(QUESTION, version="v2")]
    assert events[-1]["event"] == "on_chain_end"
    assert events[-1]["data"]["output"] == ANSWER
    record = recording.get()
    check_tree(record)
    assert record.status is RecordStatus.OK
    assert (record.input, record.output) == (QUESTION, ANSWER)
    assert len(record.contexts) == 2


async def test_astream_events_stopped_early_says_the_consumer_stopped(
        session: Session, make_retrieval_chain: Callable[..., Any]) -> None:
    """LangChain ends an event stream closed early with a CancelledError; the record says
    what happened, as for astream, and keeps the tokens the consumer saw."""
    rag = make_retrieval_chain([ANSWER])
    seen: list[str] = []
    async with ChainRecorder(rag, app_name="ev", session=session) as recording:
        events = rag.astream_events(QUESTION, version="v2")
        async for event in events:
            if event["event"] == "on_chat_model_stream":
                seen.append(event["data"]["chunk"].content)
                if len(seen) == 3:
                    break
        await events.aclose()  # type: ignore[attr-defined]
    record = recording.get()
    assert record.status is RecordStatus.CANCELLED
    assert record.error == "cancelled: the consumer stopped the stream early"
    assert record.output == "".join(seen) == ANSWER[:3]
    assert not [s.name for s in record.spans if s.error == "CancelledError"]
    assert stored_count(session) == 1


def test_a_retriever_alone_is_recorded_with_its_contexts(
        session: Session, make_retrieval_chain: Callable[..., Any]) -> None:
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.vectorstores import InMemoryVectorStore

    retriever = InMemoryVectorStore.from_texts(
        list(CORPUS), DeterministicFakeEmbedding(size=16)).as_retriever(
        search_kwargs={"k": 2})
    with ChainRecorder(retriever, app_name="ret", session=session) as recording:
        docs = retriever.invoke("France")
    record = recording.get()
    assert record.root_span().kind == "retriever"  # type: ignore[union-attr]
    assert record.input == "France"
    assert record.contexts == [d.page_content for d in docs]
    df, _ = session.get_records_and_feedback()
    assert len(df) == 1


def test_a_handler_given_to_the_model_at_construction_adds_no_record(
        session: Session) -> None:
    recorder = ChainRecorder(app_name="ctor", session=session)
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    model = FakeListChatModel(responses=["x"], callbacks=[recorder.handler])
    app = prompt | model | StrOutputParser()
    with recorder as recording:
        app.invoke({"question": "q"})
    record = recording.get()
    check_tree(record)
    assert len(record.spans) == 4
    assert stored_count(session) == 1


def test_recording_into_a_closed_session_never_reaches_another_database(
        session: Session, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCRUTINY_DATABASE_URL", raising=False)
    app = prompt_model_parser(["a"])
    recorder = ChainRecorder(app, app_name="closed", session=session)
    session.close()
    with recorder as recording:
        assert app.invoke({"question": "q"}) == "a"  # the app is unaffected
    assert recording.get().output == "a"
    assert not (tmp_path / "scrutiny.sqlite").exists()
    assert recorder.session is session


def assert_nothing_open(handler: ScrutinyCallbackHandler) -> None:
    assert handler._runs == {}, "spans leaked"
    assert handler._roots == {}, "root runs leaked"


async def test_a_cancelled_ainvoke_gives_a_cancelled_record(session: Session) -> None:
    started = asyncio.Event()

    async def slow(q: str) -> str:
        started.set()
        await asyncio.sleep(30)
        return q

    app = RunnableLambda(lambda q: q).with_config(run_name="first") | RunnableLambda(slow)
    recorder = ChainRecorder(app, app_name="cancel", session=session)
    with recorder as recording:
        task = asyncio.create_task(app.ainvoke("q"))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    record = recording.get()
    assert record.status is RecordStatus.CANCELLED
    assert record.output is None
    # a sentence, not the bare exception name
    assert record.error is not None
    assert record.error.startswith("cancelled: the call's asyncio task was cancelled")
    assert_nothing_open(recorder.handler)


def test_an_error_mid_stream_reaches_the_caller_and_keeps_the_partial_output(
        session: Session) -> None:
    from langchain_core.language_models.fake_chat_models import FakeListChatModelError

    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    model = FakeListChatModel(responses=[ANSWER], error_on_chunk_number=3)
    app = prompt | model | StrOutputParser()
    got: list[str] = []
    recorder = ChainRecorder(app, app_name="midstream", session=session)
    def consume() -> None:
        for chunk in app.stream({"question": "q"}):
            got.append(chunk)

    with recorder as recording, pytest.raises(FakeListChatModelError):
        consume()
    assert "".join(got) == ANSWER[:3]
    record = recording.get()
    assert record.status is RecordStatus.ERROR
    assert "FakeListChatModelError" in (record.error or "")
    # a failed call has no answer to judge: what it streamed is kept beside it
    assert record.output is None
    assert record.metadata["partial_output"] == ANSWER[:3]
    assert_nothing_open(recorder.handler)


def test_streams_stopped_early_leak_nothing(session: Session) -> None:
    app = prompt_model_parser([ANSWER])
    recorder = ChainRecorder(app, app_name="leak", session=session)
    with recorder as recording:
        for _ in range(5):
            stream = app.stream({"question": "q"})
            next(stream)
            stream.close()
    assert [r.status for r in recording.records] == [RecordStatus.CANCELLED] * 5
    assert_nothing_open(recorder.handler)


def test_a_plain_llm_is_an_llm_span_without_usage(session: Session) -> None:
    from langchain_core.language_models import FakeListLLM

    llm = FakeListLLM(responses=["plain text"])
    app: Any = RunnableLambda(lambda q: f"Q: {q}") | llm
    with ChainRecorder(app, app_name="llm", session=session) as recording:
        assert app.invoke("q") == "plain text"
    record = recording.get()
    check_tree(record)
    span = one(record, "llm")
    assert span.outputs == "plain text"
    assert span.inputs == "Q: q"
    assert record.usage is None
    assert record.output == "plain text"


class _Unreadable:
    """An output shaped like a prompt value whose text cannot be read."""

    def to_messages(self) -> list[Any]:
        return []

    def to_string(self) -> str:
        raise RuntimeError("cannot render")


def test_a_run_whose_values_cannot_be_read_still_gives_a_record(session: Session) -> None:
    """The record is assembled after the call, off the app's thread or when first looked
    at; a value our readers choke on is kept as it is and nothing raises."""
    app = RunnableLambda(lambda q: _Unreadable())
    recorder = ChainRecorder(app, app_name="unreadable", session=session)
    with recorder as recording:
        out = app.invoke(QUESTION)
    assert isinstance(out, _Unreadable)  # the app's call is untouched
    record = recording.get()  # does not raise
    assert record.input == QUESTION
    assert record.output is out  # kept as it is
    assert session.flush(10)
    df, _ = session.get_records_and_feedback(app_ids=["unreadable"])
    assert len(df) == 1


def test_a_failure_inside_scrutiny_at_a_calls_end_lets_the_call_go(
        session: Session, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A call whose end could not be recorded stayed open in the handler for good (its
    spans and what they hold), and its block said a stream had been left unread."""
    import logging

    import scrutiny.integrations.langchain._handler as handler_module

    def broken(*args: Any) -> int:
        raise RuntimeError("bug in scrutiny")

    chain = RunnableLambda(lambda q: q + "!", name="step") | StrOutputParser()
    recorder = ChainRecorder(chain, app_name="broken", session=session)
    monkeypatch.setattr(handler_module, "_how_it_ended", broken)
    with caplog.at_level(logging.ERROR, logger="scrutiny"), recorder as recording:
        assert chain.invoke("q") == "q!"
    assert any("bug in scrutiny" in str(r.exc_info) for r in caplog.records if r.exc_info)
    assert (recorder.handler._roots, recorder.handler._runs) == ({}, {})
    with pytest.raises(RecordingError, match="failed inside Scrutiny"):
        recording.get()
    monkeypatch.undo()
    with recorder as recording:  # the handler goes on recording
        chain.invoke("again")
    assert recording.get().output == "again!"


def test_an_output_that_holds_itself_is_recorded_without_a_flood_in_the_log(
        session: Session, caplog: pytest.LogCaptureFixture) -> None:
    """Reading the answer out of a dict of one key that holds itself recursed until a
    RecursionError, logged with a traceback some 3,000 lines long."""
    import logging

    node: dict[str, Any] = {}
    node["next"] = node
    app = RunnableLambda(lambda q: node, name="linked")
    with caplog.at_level(logging.WARNING, logger="scrutiny"):
        with ChainRecorder(app, app_name="cyclic", session=session) as recording:
            assert app.invoke("q") is node
        record = recording.get()
        assert session.flush(10)
    assert record.status is RecordStatus.OK
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert stored_count(session) == 1
