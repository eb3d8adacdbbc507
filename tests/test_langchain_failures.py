"""LangChain calls that fail in part: a tool that handled its own error (the call goes on,
the tool's span says it failed) and a stream that failed midway (a failed record, judged
as a failed invoke is)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.language_models import FakeListChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableGenerator, RunnableLambda
from langchain_core.tools import BaseTool, ToolException, tool

from scrutiny import Feedback, FeedbackStatus, Record, RecordStatus, Session, Span
from scrutiny.integrations.langchain import ChainRecorder

WAIT = 10.0
ANSWER = "Paris is the capital of France."


def _tool_span(record: Record, name: str) -> Span:
    span, = [s for s in record.spans if s.kind == "tool" and s.name == name]
    return span


def _stored(session: Session, record: Record) -> Record:
    stored = session.get_record(record.record_id)
    assert stored is not None
    return stored


# ---------------------------------------------------------------- tools that handled an error
def _failing_tool(handler: bool | str | Callable[[ToolException], str]) -> BaseTool:
    @tool
    def lookup(city: str) -> str:
        """The weather in a city (its service refuses every city)."""
        raise ToolException(f"no weather for {city}")

    lookup.handle_tool_error = handler
    return lookup


@tool
def sunny(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.mark.parametrize(("handler", "message"), [
    (True, "no weather for Oslo"),
    ("the weather service is down", "the weather service is down"),
    (lambda e: f"sorry: {e}", "sorry: no weather for Oslo"),
], ids=["true", "string", "callable"])
def test_a_tool_that_handled_its_error_in_a_chain_is_a_failed_span_of_an_ok_record(
        session: Session, handler: Any, message: str) -> None:
    """LangChain ends a tool whose ToolException it handled with on_tool_end and the bare
    message (no tool call, no ToolMessage): its span looked like a success."""
    lookup = _failing_tool(handler)
    chain = (RunnableLambda(lambda q: {"city": q}, name="ask") | lookup
             | RunnableLambda(lambda text: f"answer: {text}", name="reply"))
    with ChainRecorder(chain, app_name="tools", session=session) as recording:
        assert chain.invoke("Oslo") == f"answer: {message}"  # the app is untouched
    record = recording.get()
    assert (record.status, record.error) == (RecordStatus.OK, None)
    assert record.output == f"answer: {message}"
    span = _tool_span(record, "lookup")
    assert span.outputs == message  # what the chain was given, kept
    assert span.error is not None
    assert span.error.endswith(message)
    assert [s.name for s in record.spans if s.error] == ["lookup"]
    stored = _stored(session, record)
    assert stored.status is RecordStatus.OK
    assert _tool_span(stored, "lookup").error == span.error


async def test_an_async_tool_called_with_a_tool_call_that_handled_its_error(
        session: Session) -> None:
    @tool
    async def lookup(city: str) -> str:
        """The weather in a city."""
        raise ToolException(f"no weather for {city}")

    lookup.handle_tool_error = True

    async def both(city: str) -> list[Any]:
        call = {"name": "lookup", "args": {"city": city}, "id": "c1", "type": "tool_call"}
        return [await lookup.ainvoke(call), await sunny.ainvoke({"city": city})]

    app = RunnableLambda(both, name="agent_step")
    with ChainRecorder(app, app_name="tools", session=session) as recording:
        failed, ok = await app.ainvoke("Oslo")
    assert isinstance(failed, ToolMessage)
    assert failed.status == "error"
    assert ok == "sunny in Oslo"
    record = recording.get()
    assert record.status is RecordStatus.OK
    span = _tool_span(record, "lookup")
    # (the tool's value, as when it is called with its arguments; the message's tool call
    # in the span's metadata)
    assert span.outputs == failed.content
    assert span.metadata["tool_call_id"] == failed.tool_call_id
    assert span.error is not None
    assert span.error.endswith("no weather for Oslo")
    assert _tool_span(record, "sunny").error is None  # a tool that succeeded


def test_a_tool_that_refused_its_input_with_handle_validation_error(
        session: Session) -> None:
    @tool
    def count(n: int) -> str:
        """Count to n."""
        return " ".join(str(i) for i in range(n))

    count.handle_validation_error = "n must be a number"
    with ChainRecorder(count, app_name="tools", session=session) as recording:
        assert count.invoke({"n": "many"}) == "n must be a number"
    record = recording.get()
    assert (record.status, record.error, record.output) == (
        RecordStatus.OK, None, "n must be a number")
    assert _tool_span(record, "count").error is not None


def _tool_graph(node: Any, tool_name: str) -> Any:
    from langgraph.graph import END, START, MessagesState, StateGraph

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage(content="", tool_calls=[
            {"name": tool_name, "args": {"city": "Oslo"}, "id": "c1", "type": "tool_call"}])]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", agent)
    graph.add_node("tools", node)
    graph.add_edge(START, "agent")
    graph.add_edge("agent", "tools")
    graph.add_edge("tools", END)
    return graph.compile()


def test_a_tool_node_tool_that_handled_its_error_is_a_failed_span_of_an_ok_record(
        session: Session) -> None:
    """In a ToolNode the tool gets a tool call: LangChain ends it with on_tool_end and a
    ToolMessage of status "error"."""
    pytest.importorskip("langgraph")
    from langgraph.prebuilt import ToolNode

    app = _tool_graph(ToolNode([_failing_tool(True)]), "lookup")
    answered = Feedback(lambda output: float("no weather" in output),
                        name="answered").on_output()
    with ChainRecorder(app, app_name="graph", feedbacks=[answered],
                       session=session) as recording:
        state = app.invoke({"messages": [HumanMessage("Weather in Oslo?")]})
    seen = state["messages"][-1]
    assert (seen.content, seen.status) == ("no weather for Oslo", "error")
    record = recording.get()
    assert (record.status, record.error) == (RecordStatus.OK, None)
    assert record.output == "no weather for Oslo"
    span = _tool_span(record, "lookup")
    assert span.outputs == seen.content
    assert span.error is not None
    assert span.error.endswith("no weather for Oslo")
    assert [s.name for s in record.spans if s.error] == ["lookup"]
    result = record.wait_for_feedback_results(timeout=WAIT)[answered]
    assert (result.status, result.result) == (FeedbackStatus.DONE, 1.0)
    assert _stored(session, record).status is RecordStatus.OK


def test_a_tool_node_that_handles_a_tools_exception_keeps_the_record_ok(
        session: Session) -> None:
    """ToolNode(handle_tool_errors=True) catches what the tool raised: the tool ended with
    on_tool_error, the node and the call did not fail."""
    pytest.importorskip("langgraph")
    from langgraph.prebuilt import ToolNode

    @tool
    def forecast(city: str) -> str:
        """The forecast for a city."""
        raise ConnectionError(f"forecast service down for {city}")

    app = _tool_graph(ToolNode([forecast], handle_tool_errors=True), "forecast")
    with ChainRecorder(app, app_name="graph", session=session) as recording:
        state = app.invoke({"messages": [HumanMessage("Forecast for Oslo?")]})
    assert state["messages"][-1].status == "error"
    record = recording.get()
    assert (record.status, record.error) == (RecordStatus.OK, None)
    assert "forecast service down for Oslo" in (record.output or "")
    assert _tool_span(record, "forecast").error == \
        "ConnectionError: forecast service down for Oslo"
    assert [s.name for s in record.spans if s.error] == ["forecast"]


# ---------------------------------------------------------------- streams that failed midway
class _Broken(Exception):
    pass


_BREAKS_AT = 5


def _breaks_midway(chunks: Iterator[str]) -> Iterator[str]:
    """Passes chunks on until 5 characters went through, then raises (an invoke, given
    the whole answer as one chunk, raises at once)."""
    passed = 0
    for chunk in chunks:
        passed += len(chunk)
        if passed > _BREAKS_AT:
            raise _Broken("the stream broke")
        yield chunk


async def _abreaks_midway(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    passed = 0
    async for chunk in chunks:
        passed += len(chunk)
        if passed > _BREAKS_AT:
            raise _Broken("the stream broke")
        yield chunk


def _judges() -> list[Feedback]:
    return [Feedback(lambda output: 1.0, name="answer").on_output(),
            Feedback(lambda input, output: 1.0, name="relevance").on_input_output(),
            Feedback(lambda input: 1.0, name="question").on_input()]


def _outcomes(record: Record) -> dict[str, tuple[FeedbackStatus, float | None, str]]:
    results = record.wait_for_feedback_results(timeout=WAIT)
    return {fb.name: (r.status, r.result, (r.error or "").replace(record.record_id, "<id>"))
            for fb, r in results.items()}


def _answer_chain() -> Any:
    """A chain whose last step passes the model's chunks on, then raises."""
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    relay = RunnableGenerator(_breaks_midway, _abreaks_midway, name="relay")
    return prompt | FakeListChatModel(responses=[ANSWER] * 3) | StrOutputParser() | relay


def test_an_exception_whose_message_cannot_be_read_still_gives_an_error_record(
        session: Session) -> None:
    """Describing the error raised inside the handler, so the run never ended: no record,
    and the call stayed open in the handler for good."""
    from tests.support.errors import UNREADABLE, Unprintable

    def step(question: str) -> str:
        raise Unprintable

    chain = RunnableLambda(step, name="step") | StrOutputParser()
    recorder = ChainRecorder(chain, app_name="unreadable", session=session)
    with recorder as recording, pytest.raises(Unprintable):
        chain.invoke("q")
    record = recording.get()
    assert (record.status, record.error) == (RecordStatus.ERROR, UNREADABLE)
    assert [s.error for s in record.spans if s.error] == [UNREADABLE, UNREADABLE]
    assert recorder.handler._roots == {}


def test_a_stream_that_failed_midway_is_a_failed_record_judged_like_a_failed_invoke(
        session: Session) -> None:
    """Its partial output was the record's output, and its feedbacks judged it as the
    answer; a failed invoke's feedbacks that need the answer end skipped."""
    app = _answer_chain()
    recorder = ChainRecorder(app, app_name="broken", feedbacks=_judges(), session=session)
    got: list[str] = []

    def consume() -> None:
        for chunk in app.stream({"question": "Capital of France?"}):
            got.append(chunk)

    with recorder as recording, pytest.raises(_Broken):
        consume()
    assert "".join(got) == ANSWER[:_BREAKS_AT]  # the chunks reached the caller
    streamed = recording.get()
    with recorder as recording, pytest.raises(_Broken):
        app.invoke({"question": "Capital of France?"})
    invoked = recording.get()

    assert streamed.status is invoked.status is RecordStatus.ERROR
    assert streamed.error == invoked.error == "_Broken: the stream broke"
    assert streamed.output is invoked.output is None
    partial = streamed.metadata["partial_output"]  # kept, to be seen
    assert isinstance(partial, str)
    assert partial.startswith("".join(got))
    assert "partial_output" not in invoked.metadata
    outcomes = _outcomes(streamed)
    assert outcomes == _outcomes(invoked)
    assert outcomes["answer"][0] is outcomes["relevance"][0] is FeedbackStatus.SKIPPED
    assert outcomes["question"][:2] == (FeedbackStatus.DONE, 1.0)
    stored = _stored(session, streamed)
    assert (stored.status, stored.output) == (RecordStatus.ERROR, None)
    assert stored.metadata["partial_output"] == partial


async def test_an_astream_that_failed_midway_is_judged_like_a_failed_ainvoke(
        session: Session) -> None:
    app = _answer_chain()
    recorder = ChainRecorder(app, app_name="broken", feedbacks=_judges(), session=session)
    got: list[str] = []

    async def consume() -> None:
        async for chunk in app.astream({"question": "Capital of France?"}):
            got.append(chunk)

    async with recorder as recording:
        with pytest.raises(_Broken):
            await consume()
    assert "".join(got) == ANSWER[:_BREAKS_AT]
    streamed = recording.get()
    async with recorder as recording:
        with pytest.raises(_Broken):
            await app.ainvoke({"question": "Capital of France?"})
    invoked = recording.get()
    assert streamed.status is invoked.status is RecordStatus.ERROR
    assert streamed.error == invoked.error
    assert streamed.output is None
    assert streamed.metadata["partial_output"]
    assert _outcomes(streamed) == _outcomes(invoked)


# ------------------------------------ a step after the model fails: what the caller received
def _passes_two_then_breaks(chunks: Iterator[str]) -> Iterator[str]:
    """Reads the model's whole answer, passes on two pieces of it, then raises."""
    text = "".join(chunks)
    yield text[:5]
    yield text[5:10]
    raise _Broken("the step broke")


async def _apasses_two_then_breaks(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    text = "".join([chunk async for chunk in chunks])
    yield text[:5]
    yield text[5:10]
    raise _Broken("the step broke")


def _two_chunks_chain() -> Any:
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    step = RunnableGenerator(_passes_two_then_breaks, _apasses_two_then_breaks, name="two")
    return prompt | FakeListChatModel(responses=[ANSWER] * 3) | StrOutputParser() | step


def _model_text(record: Record) -> Any:
    model, = [s for s in record.spans if s.kind == "chat_model"]
    return model.outputs


def test_a_stream_whose_last_step_failed_keeps_what_the_caller_received(
        session: Session) -> None:
    """The model streamed its whole answer, the step after it passed on two chunks and
    raised: the partial output is those two chunks (it was the model's whole text)."""
    app = _two_chunks_chain()
    got: list[str] = []

    def consume() -> None:
        for chunk in app.stream({"question": "Capital of France?"}):
            got.append(chunk)

    with ChainRecorder(app, app_name="two", session=session) as recording, \
            pytest.raises(_Broken):
        consume()
    record = recording.get()
    assert got == [ANSWER[:5], ANSWER[5:10]]
    assert _model_text(record) == ANSWER  # (the model's text did not reach the caller)
    assert (record.status, record.output) == (RecordStatus.ERROR, None)
    assert record.metadata["partial_output"] == "".join(got)
    assert _stored(session, record).metadata["partial_output"] == "".join(got)


async def test_an_astream_whose_last_step_failed_keeps_what_the_caller_received(
        session: Session) -> None:
    app = _two_chunks_chain()
    got: list[str] = []

    async def consume() -> None:
        async for chunk in app.astream({"question": "Capital of France?"}):
            got.append(chunk)

    async with ChainRecorder(app, app_name="two", session=session) as recording:
        with pytest.raises(_Broken):
            await consume()
    record = recording.get()
    assert got == [ANSWER[:5], ANSWER[5:10]]
    assert _model_text(record) == ANSWER
    assert (record.status, record.output) == (RecordStatus.ERROR, None)
    assert record.metadata["partial_output"] == "".join(got)


def test_a_stream_that_failed_before_its_first_chunk_has_no_partial_output(
        session: Session) -> None:
    """The model streamed, the step after it raised before passing anything on: the
    caller received nothing, so nothing is kept as received."""
    def breaks_at_once(chunks: Iterator[str]) -> Iterator[str]:
        "".join(chunks)
        raise _Broken("the step broke")
        yield ""  # (a generator)

    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    app = prompt | FakeListChatModel(responses=[ANSWER]) | StrOutputParser() \
        | RunnableGenerator(breaks_at_once)
    with ChainRecorder(app, app_name="none", session=session) as recording, \
            pytest.raises(_Broken):
        list(app.stream({"question": "Capital of France?"}))
    record = recording.get()
    assert _model_text(record) == ANSWER
    assert record.status is RecordStatus.ERROR
    assert "partial_output" not in record.metadata


async def test_an_astream_cancelled_after_a_later_step_passed_two_chunks_keeps_those(
        session: Session) -> None:
    """The step after the model passed on two chunks, then waited; the task was cancelled:
    the cancelled record's output is the two chunks, not the model's whole text."""
    received_two = asyncio.Event()
    never = asyncio.Event()

    async def passes_two_then_waits(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        text = "".join([chunk async for chunk in chunks])
        yield text[:5]
        yield text[5:10]
        await never.wait()
        yield text[10:]

    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    app = prompt | FakeListChatModel(responses=[ANSWER]) | StrOutputParser() \
        | RunnableGenerator(passes_two_then_waits)
    got: list[str] = []

    async def consume() -> None:
        async for chunk in app.astream({"question": "Capital of France?"}):
            got.append(chunk)
            if len(got) == 2:
                received_two.set()

    async with ChainRecorder(app, app_name="waits", session=session) as recording:
        task = asyncio.create_task(consume())
        await asyncio.wait_for(received_two.wait(), WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    record = recording.get()
    assert _model_text(record) == ANSWER
    assert record.status is RecordStatus.CANCELLED
    assert record.output == "".join(got) == ANSWER[:10]


@pytest.mark.parametrize("call", ["stream", "astream", "invoke", "ainvoke"])
async def test_a_generator_app_that_failed_keeps_what_its_stream_passed_on(
        session: Session, call: str) -> None:
    """A RunnableGenerator app streamed two chunks, then raised: they are its partial
    output. Invoked, it reads its own stream and its caller receives none: none is kept."""
    def two_then_breaks(chunks: Iterator[str]) -> Iterator[str]:
        for _ in chunks:
            pass
        yield "Par"
        yield "is"
        raise _Broken("the generator broke")

    async def atwo_then_breaks(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        async for _ in chunks:
            pass
        yield "Par"
        yield "is"
        raise _Broken("the generator broke")

    app = RunnableGenerator(two_then_breaks, atwo_then_breaks, name="gen")
    got: list[str] = []

    async def call_it() -> None:
        if call == "stream":
            got.extend(app.stream("q"))
        elif call == "astream":
            got.extend([chunk async for chunk in app.astream("q")])
        elif call == "invoke":
            app.invoke("q")
        else:
            await app.ainvoke("q")

    async with ChainRecorder(app, app_name="gen", session=session) as recording:
        with pytest.raises(_Broken):
            await call_it()
    record = recording.get()
    assert (record.status, record.output) == (RecordStatus.ERROR, None)
    if call.endswith("stream"):
        assert record.metadata["partial_output"] == "Paris"
    else:
        assert "partial_output" not in record.metadata
