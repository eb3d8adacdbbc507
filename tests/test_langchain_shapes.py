"""Shapes LangChain 1.x users build: agents with tools, structured output, several recorders
in one block. Each top-level call gives exactly one record, in the recorder of the app that
made it, with the input, output and span tree a user would name."""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.documents import Document
from langchain_core.language_models import FakeListChatModel, FakeMessagesListChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda, RunnableParallel
from langchain_core.tools import tool
from pydantic import BaseModel

from scrutiny import Feedback, FeedbackStatus, Record, RecordStatus, Session, Span
from scrutiny.integrations.langchain import ChainRecorder

WAIT = 10.0


class ToolCallingModel(FakeMessagesListChatModel):
    """A fake chat model that accepts tools (its replies may ask for them)."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self


def asks(name: str, args: dict[str, Any], call_id: str = "call_1") -> AIMessage:
    return AIMessage(content="", tool_calls=[
        {"name": name, "args": args, "id": call_id, "type": "tool_call"}])


def qa_chain(answer: str) -> Any:
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    return prompt | FakeListChatModel(responses=[answer]) | StrOutputParser()


def parents(record: Record) -> dict[str, str | None]:
    """Each span's name -> its parent's name (names are unique in these apps)."""
    by_id = {s.span_id: s for s in record.spans}
    assert sum(s.parent_id is None for s in record.spans) == 1
    assert all(s.parent_id is None or s.parent_id in by_id for s in record.spans)
    return {s.name: by_id[s.parent_id].name if s.parent_id else None for s in record.spans}


def app_ids(session: Session) -> list[str]:
    assert session.flush(WAIT)
    df, _ = session.get_records_and_feedback()
    return sorted(df["app_id"])


# ---------------------------------------------------------------- several recorders at once
def test_two_recorders_in_one_block_record_only_their_own_chain(session: Session) -> None:
    """Each open recorder recorded every call of the block: the weather chain's call was
    stored (and judged) as a call of the news app too, and the other way round."""
    weather, news = qa_chain("sunny").with_config(run_name="weather"), \
        qa_chain("calm").with_config(run_name="news")
    judged: list[str] = []
    seen = Feedback(lambda output: float(judged.append(output) or 1), name="seen").on_output()
    rec_w = ChainRecorder(weather, app_name="weather", session=session, feedbacks=[seen])
    rec_n = ChainRecorder(news, app_name="news", session=session, feedbacks=[seen])
    with rec_w as weather_calls, rec_n as news_calls:
        assert weather.invoke({"question": "weather?"}) == "sunny"
        assert news.invoke({"question": "news?"}) == "calm"
    assert [(r.input, r.output) for r in weather_calls.records] == [("weather?", "sunny")]
    assert [(r.input, r.output) for r in news_calls.records] == [("news?", "calm")]
    assert weather_calls.get().root_span().name == "weather"  # type: ignore[union-attr]
    assert session.wait_for_feedback(WAIT)
    assert sorted(judged) == ["calm", "sunny"]
    assert app_ids(session) == ["news:v1", "weather:v1"]


async def test_two_recorders_async_with_parallel_branches(session: Session) -> None:
    """A chain whose branches run as asyncio tasks: the other recorder made a record of
    each branch (their parent was not its own)."""

    async def slow(x: dict[str, str]) -> str:
        await asyncio.sleep(0)
        return x["question"].upper()

    fan = RunnableParallel(a=RunnableLambda(slow), b=RunnableLambda(slow)) | RunnableLambda(
        lambda d: f"{d['a']}+{d['b']}")
    single = qa_chain("one")
    rec_fan = ChainRecorder(fan, app_name="fan", session=session)
    rec_single = ChainRecorder(single, app_name="single", session=session)
    async with rec_fan as fans, rec_single as singles:
        outs = await asyncio.gather(fan.ainvoke({"question": "x"}),
                                    single.ainvoke({"question": "y"}),
                                    fan.ainvoke({"question": "z"}))
    assert outs == ["X+X", "one", "Z+Z"]
    assert sorted(r.output for r in fans.records) == ["X+X", "Z+Z"]
    assert all(len(r.spans) == 5 for r in fans.records)  # sequence, parallel, 2 + 1 lambdas
    assert [r.output for r in singles.records] == ["one"]
    assert app_ids(session) == ["fan:v1", "fan:v1", "single:v1"]
    for handler in (rec_fan.handler, rec_single.handler):  # nothing left open
        assert (handler._runs, handler._roots, handler._foreign) == ({}, {}, {})


def test_two_recorders_with_batch_and_threads(session: Session) -> None:
    first, second = qa_chain("first"), qa_chain("second")
    rec_1 = ChainRecorder(first, app_name="first", session=session)
    rec_2 = ChainRecorder(second, app_name="second", session=session)
    with rec_1 as ones, rec_2 as twos:
        first.batch([{"question": f"q{i}"} for i in range(5)], config={"max_concurrency": 2})
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(contextvars.copy_context().run, second.invoke,
                                   {"question": f"t{i}"}) for i in range(6)]
            assert [f.result() for f in futures] == ["second"] * 6
    assert sorted(r.input for r in ones.records) == [f"q{i}" for i in range(5)]
    assert sorted(r.input for r in twos.records) == [f"t{i}" for i in range(6)]
    assert all(len(r.spans) == 4 for r in [*ones.records, *twos.records])


@pytest.mark.parametrize("how", ["abatch", "abatch_as_completed"])
async def test_two_recorders_with_abatch(session: Session, how: str) -> None:
    """A sequence's `abatch` starts each input's run in a task of its own (gather), whose
    stack does not reach the app's method: the other open recorder recorded every input
    of the batch as a call of its app too."""
    first, second = qa_chain("first"), qa_chain("second")
    rec_1 = ChainRecorder(first, app_name="first", session=session)
    rec_2 = ChainRecorder(second, app_name="second", session=session)
    inputs = [{"question": f"q{i}"} for i in range(3)]
    async with rec_1 as ones, rec_2 as twos:
        if how == "abatch":
            assert await first.abatch(inputs) == ["first"] * 3
        else:
            assert [out async for _, out in first.abatch_as_completed(inputs)] == \
                ["first"] * 3
        assert await second.ainvoke({"question": "t"}) == "second"
    assert sorted(r.input for r in ones.records) == ["q0", "q1", "q2"]
    assert [r.input for r in twos.records] == ["t"]
    assert app_ids(session) == ["first:v1"] * 3 + ["second:v1"]


def test_a_chain_called_in_a_tool_of_another_recorded_chain(session: Session) -> None:
    """The expert's recorder recorded the whole outer call as the expert's (input, output
    and spans of the outer app), and never the expert's own call."""
    expert = qa_chain("expert answer").with_config(run_name="expert")

    @tool
    def ask_expert(question: str) -> str:
        """Ask the expert."""
        return expert.invoke({"question": question})

    model = ToolCallingModel(responses=[asks("ask_expert", {"question": "deep?"})])
    outer = (ChatPromptTemplate.from_messages([("human", "{question}")]) | model
             | RunnableLambda(lambda m: ask_expert.invoke(m.tool_calls[0]["args"]),
                              name="run_tool"))
    rec_outer = ChainRecorder(outer, app_name="outer", session=session)
    rec_expert = ChainRecorder(expert, app_name="expert", session=session)
    with rec_outer as outer_calls, rec_expert as expert_calls:
        assert outer.invoke({"question": "big question"}) == "expert answer"

    whole = outer_calls.get()
    assert (whole.input, whole.output) == ("big question", "expert answer")
    tree = parents(whole)
    assert (tree["ask_expert"], tree["expert"], tree["FakeListChatModel"]) == (
        "run_tool", "ask_expert", "expert")  # the expert's call, under the tool
    call = expert_calls.get()
    assert (call.input, call.output) == ("deep?", "expert answer")
    assert [(s.name, s.kind) for s in call.spans] == [
        ("expert", "chain"), ("ChatPromptTemplate", "prompt"),
        ("FakeListChatModel", "chat_model"), ("StrOutputParser", "parser")]
    assert parents(call)["FakeListChatModel"] == "expert"
    assert app_ids(session) == ["expert:v1", "outer:v1"]


def test_a_recorder_without_an_app_still_records_every_call(session: Session) -> None:
    first, second = qa_chain("a"), qa_chain("b")
    everything = ChainRecorder(app_name="all", session=session)
    rec_1 = ChainRecorder(first, app_name="first", session=session)
    rec_2 = ChainRecorder(second, app_name="second", session=session)
    with everything as all_calls, rec_1 as ones, rec_2 as twos:
        first.invoke({"question": "1"})
        second.invoke({"question": "2"})
    assert [r.input for r in all_calls.records] == ["1", "2"]
    assert [r.input for r in ones.records] == ["1"]
    assert [r.input for r in twos.records] == ["2"]


# ---------------------------------------------------------------- retries and fallbacks
async def _call(app: Any, call: str, question: str, config: Any) -> str:
    """`app`'s answer to `question`, asked with `call` (a stream's chunks joined)."""
    if call == "invoke":
        return str(app.invoke(question, config=config))
    if call == "ainvoke":
        return str(await app.ainvoke(question, config=config))
    if call == "stream":
        return "".join(app.stream(question, config=config))
    return "".join([c async for c in app.astream(question, config=config)])


@pytest.mark.parametrize("call", ["invoke", "ainvoke", "stream", "astream"])
async def test_fallbacks_with_the_handler_passed_per_call_give_one_record(
        session: Session, call: str) -> None:
    """`with_fallbacks` runs its runnables with the config it was given: with the handler
    in that config, the failed primary and the fallback that answered were two more
    records of the one call (one of them an error)."""

    def primary(question: str) -> str:
        raise ConnectionError("primary down")

    app = RunnableLambda(primary, name="primary").with_fallbacks(
        [FakeListChatModel(responses=["from the fallback"]) | StrOutputParser()])
    recorder = ChainRecorder(app, app_name="fb", session=session)
    config: Any = {"callbacks": [recorder.handler]}
    out = await _call(app, call, "q", config)
    assert out == "from the fallback"
    record, = recorder.handler.records
    assert (record.status, record.input, record.output) == (
        RecordStatus.OK, "q", "from the fallback")
    tree = parents(record)
    assert tree["primary"] == "RunnableWithFallbacks"
    assert tree["RunnableSequence"] == "RunnableWithFallbacks"
    assert [s.error for s in record.spans if s.error] == ["ConnectionError: primary down"]
    assert app_ids(session) == ["fb:v1"]


def _down(name: str) -> Any:
    def fail(question: str) -> str:
        raise ConnectionError(f"{name} down")

    return RunnableLambda(fail, name=name)


@pytest.mark.parametrize("call", ["invoke", "ainvoke", "stream", "astream"])
@pytest.mark.parametrize("shape", ["fallback_with_fallbacks", "fallbacks_of_fallbacks",
                                   "bound_with_config"])
async def test_nested_fallbacks_with_the_handler_passed_per_call_give_one_record(
        session: Session, call: str, shape: str) -> None:
    """Only a root `with_fallbacks` run took its runnables back as steps: with a fallback
    that has fallbacks of its own (or a `with_fallbacks` of one), the inner one's runnables
    were records of their own, so one call gave three (a failed one among them)."""
    answer = FakeListChatModel(responses=["third"]) | StrOutputParser()
    if shape == "fallbacks_of_fallbacks":
        app: Any = _down("first").with_fallbacks([_down("second")]).with_fallbacks([answer])
    else:
        app = _down("first").with_fallbacks([_down("second").with_fallbacks([answer])])
    recorder = ChainRecorder(app, app_name="fb", session=session)
    config: Any = {"callbacks": [recorder.handler]}
    if shape == "bound_with_config":
        app, config = app.with_config(config), None
    out = await _call(app, call, "q", config)
    assert out == "third"
    record, = recorder.handler.records
    assert (record.status, record.input, record.output) == (RecordStatus.OK, "q", "third")
    names = [s.name for s in record.spans]
    assert {"first", "second", "RunnableSequence"} <= set(names)
    assert {s.error for s in record.spans if s.error} == {  # (an inner fallbacks run
        "ConnectionError: first down", "ConnectionError: second down"}  # fails as its first)


@pytest.mark.parametrize("call", ["invoke", "ainvoke"])
async def test_a_call_given_its_own_callbacks_inside_a_step_is_a_record_of_its_own(
        session: Session, call: str) -> None:
    """The fallbacks fix attached any run without a parent to the run the context named:
    a chain a step calls with `config={"callbacks": [handler]}` (a root run for LangChain)
    lost its record and became a span of the step's."""
    recorder = ChainRecorder(app_name="calls", session=session)
    handler = recorder.handler
    inner = RunnableLambda(lambda q: q + "!", name="inner")

    def step(q: str) -> str:
        return inner.invoke(q, config={"callbacks": [handler]})

    async def astep(q: str) -> str:
        return await inner.ainvoke(q, config={"callbacks": [handler]})

    outer = RunnableLambda(step, afunc=astep, name="outer")
    if call == "invoke":
        out = outer.invoke("hi", config={"callbacks": [handler]})
    else:
        out = await outer.ainvoke("hi", config={"callbacks": [handler]})
    assert out == "hi!"
    assert sorted((r.root_span().name, [s.name for s in r.spans])  # type: ignore[union-attr]
                  for r in handler.records) == [("inner", ["inner"]), ("outer", ["outer"])]


def test_retries_inside_a_recorded_call_are_spans_of_its_record(session: Session) -> None:
    attempts: list[str] = []

    def flaky(question: str) -> str:
        attempts.append(question)
        if len(attempts) < 3:
            raise TimeoutError(f"attempt {len(attempts)}")
        return question

    app = RunnableLambda(flaky).with_retry(stop_after_attempt=3,
                                           wait_exponential_jitter=False) | qa_chain("ok")
    with ChainRecorder(app, app_name="retry", session=session) as recording:
        assert app.batch([{"question": "q"}], config={"max_concurrency": 2}) == ["ok"]
    record = recording.get()
    assert (record.status, record.input, record.output) == (RecordStatus.OK, "q", "ok")
    errors = [s.error for s in record.spans if s.error]
    assert errors == ["TimeoutError: attempt 1", "TimeoutError: attempt 2"]
    retry, = [s for s in record.spans if s.name == "flaky" and s.parent_id == record.root_run_id]
    assert [s.name for s in record.spans if s.parent_id == retry.span_id] == ["flaky"] * 3


# ---------------------------------------------------------------- structured output
class Answer(BaseModel):
    """An answer and how sure the model is."""

    answer: str
    confidence: float


def test_structured_output_with_raw_gives_the_parsed_object(session: Session) -> None:
    """`with_structured_output(..., include_raw=True)` returns {"raw", "parsed",
    "parsing_error"}: that whole dict, with the model's message, was the output a
    feedback judged."""
    model = ToolCallingModel(responses=[asks("Answer", {"answer": "Paris", "confidence": 0.9})])
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    chain = prompt | model.with_structured_output(Answer, include_raw=True)
    confidence = Feedback(lambda output: output.confidence, name="confidence").on_output()
    with ChainRecorder(chain, app_name="so", session=session,
                       feedbacks=[confidence]) as recording:
        result = chain.invoke({"question": "Capital of France?"})
    assert result["parsed"] == Answer(answer="Paris", confidence=0.9)
    record = recording.get()
    assert record.output == Answer(answer="Paris", confidence=0.9)
    outcome = record.wait_for_feedback_results(timeout=WAIT)[confidence]
    assert (outcome.status, outcome.result) == (FeedbackStatus.DONE, 0.9)


def test_structured_output_that_failed_to_parse_keeps_the_models_text(
        session: Session) -> None:
    model = FakeMessagesListChatModel(responses=[AIMessage(content="I cannot say.")])
    raw = RunnableParallel(raw=model, parsed=RunnableLambda(lambda _: None),
                           parsing_error=RunnableLambda(lambda _: "no tool call"))
    with ChainRecorder(raw, app_name="so", session=session) as recording:
        raw.invoke("Capital of France?")
    assert recording.get().output == "I cannot say."


def test_structured_output_without_raw_is_the_object(session: Session) -> None:
    model = ToolCallingModel(responses=[asks("Answer", {"answer": "Paris", "confidence": 0.5})])
    chain = model.with_structured_output(Answer)
    with ChainRecorder(chain, app_name="so", session=session) as recording:
        chain.invoke("Capital of France?")
    record = recording.get()
    assert record.output == Answer(answer="Paris", confidence=0.5)
    assert record.input == "Capital of France?"
    stored = session.get_record(record.record_id) if session.flush(WAIT) else None
    assert stored is not None
    assert stored.output == {"answer": "Paris", "confidence": 0.5}


def test_an_agents_structured_response_is_its_output(session: Session) -> None:
    """The state `create_agent(..., response_format=...)` returns: its last message only
    says 'Returning structured response: ...', and that line was the record's output."""
    weather = Answer(answer="sunny", confidence=1.0)

    def agent_like(state: dict[str, Any]) -> dict[str, Any]:
        return {"messages": [*state["messages"], asks("Answer", weather.model_dump()),
                             ToolMessage(content=f"Returning structured response: {weather}",
                                         tool_call_id="call_1")],
                "structured_response": weather}

    app = RunnableLambda(agent_like)
    with ChainRecorder(app, app_name="agent", session=session) as recording:
        app.invoke({"messages": [HumanMessage(content="Weather?")]})
    record = recording.get()
    assert record.input == "Weather?"
    assert record.output == weather


# ---------------------------------------------------------------- create_agent (LangChain 1.x)
@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@tool
def get_forecast(city: str) -> str:
    """The forecast for a city (its service is down)."""
    raise ConnectionError(f"forecast service down for {city}")


def _agent(*replies: AIMessage, tools: Any = None, **kwargs: Any) -> Any:
    from langchain.agents import create_agent

    return create_agent(ToolCallingModel(responses=list(replies)),
                               tools=tools or [get_weather, get_forecast], **kwargs)


def _spans(record: Record, kind: str) -> list[Span]:
    return [s for s in record.spans if s.kind == kind]


def test_create_agent_with_a_tool_gives_one_record(session: Session) -> None:
    agent = _agent(asks("get_weather", {"city": "Paris"}),
                   AIMessage(content="It is sunny in Paris.", usage_metadata={
                       "input_tokens": 12, "output_tokens": 6, "total_tokens": 18}),
                   system_prompt="Be brief.")
    io = Feedback(lambda input, output: float("Paris" in input and "sunny" in output),
                  name="io").on_input_output()
    with ChainRecorder(agent, app_name="agent", feedbacks=[io],
                       session=session) as recording:
        state = agent.invoke({"messages": [{"role": "user", "content": "Weather in Paris?"}]})
    assert state["messages"][-1].content == "It is sunny in Paris."
    assert len(recording.records) == 1
    record = recording.get()
    assert (record.input, record.output) == ("Weather in Paris?", "It is sunny in Paris.")
    assert record.status is RecordStatus.OK
    tool_span, = _spans(record, "tool")
    assert (tool_span.name, tool_span.inputs) == ("get_weather", {"city": "Paris"})
    by_id = {s.span_id: s for s in record.spans}
    assert by_id[tool_span.parent_id].name == "tools"  # type: ignore[index]
    first, second = _spans(record, "chat_model")
    assert first.outputs["tool_calls"][0]["name"] == "get_weather"
    assert (first.usage, second.usage is not None) == (None, True)
    assert record.usage is not None
    assert (record.usage.prompt_tokens, record.usage.total_tokens) == (12, 18)
    outcome = record.wait_for_feedback_results(timeout=WAIT)[io]
    assert (outcome.status, outcome.result) == (FeedbackStatus.DONE, 1.0)


def test_create_agent_whose_tool_raises(session: Session) -> None:
    agent = _agent(asks("get_forecast", {"city": "Paris"}), AIMessage(content="never"))
    with ChainRecorder(agent, app_name="agent", session=session) as recording, \
            pytest.raises(ConnectionError, match="forecast service down for Paris"):
        agent.invoke({"messages": [("user", "Forecast for Paris?")]})
    record = recording.get()
    assert record.status is RecordStatus.ERROR
    assert record.error == "ConnectionError: forecast service down for Paris"
    assert record.input == "Forecast for Paris?"
    assert record.usage is None  # the fake model reports none: not 0
    tool_span, = _spans(record, "tool")
    assert tool_span.error == record.error
    assert {s.name for s in record.spans if s.error} == {"LangGraph", "tools", "get_forecast"}
    assert all(s.end_time is not None for s in record.spans)


def test_create_agent_stream_stopped_after_the_first_step(session: Session) -> None:
    """Each model step of `create_agent` returns a list of LangGraph Commands: a stream
    the consumer left after that step recorded the Command objects as the output."""
    agent = _agent(asks("get_weather", {"city": "Paris"}), AIMessage(content="never read"))
    said = Feedback(lambda output: float("get_weather" in output), name="said").on_output()
    with ChainRecorder(agent, app_name="agent", feedbacks=[said],
                       session=session) as recording:
        stream = agent.stream({"messages": [("user", "Weather in Paris?")]},
                              stream_mode="updates")
        assert list(next(stream)) == ["model"]
        stream.close()
    record = recording.get()
    assert record.status is RecordStatus.CANCELLED
    assert record.output == '[tool call] get_weather({"city": "Paris"})'
    result = record.wait_for_feedback_results(timeout=WAIT)[said]
    assert (result.status, result.result) == (FeedbackStatus.DONE, 1.0)



def test_create_agent_paused_in_a_tool_records_what_it_asked(session: Session) -> None:
    """LangGraph's human-in-the-loop pattern: a tool calls interrupt() to ask the user for
    approval. The run paused before any answer, yet the record's output — what output
    feedbacks judge — was the model's call of that tool, not what the run asked."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command, interrupt

    @tool
    def book(city: str) -> str:
        """Book a flight to a city."""
        return "booked" if interrupt(f"Book a flight to {city}?") == "yes" else "not booked"

    agent = _agent(asks("book", {"city": "Cork"}), AIMessage(content="Your flight is booked."),
                   tools=[book], checkpointer=InMemorySaver())
    judged: list[Any] = []
    seen = Feedback(lambda output: judged.append(output) or 1.0, name="seen").on_output()
    config: Any = {"configurable": {"thread_id": "hitl"}}
    recorder = ChainRecorder(agent, app_name="hitl", feedbacks=[seen], session=session)
    with recorder as paused:
        agent.invoke({"messages": [("user", "Book me a flight to Cork")]}, config)
    with recorder as resumed:
        agent.invoke(Command(resume="yes"), config)
    record, answered = paused.get(), resumed.get()
    assert (record.tags, record.metadata["interrupted_at"]) == (["interrupted"], "tools")
    assert record.output == record.metadata["interrupt"] == "Book a flight to Cork?"
    assert answered.output == "Your flight is booked."
    for each in (record, answered):
        each.wait_for_feedback_results(timeout=WAIT)
    assert sorted(judged) == ["Book a flight to Cork?", "Your flight is booked."]

# ---------------------------------------------------------------- retrieval in a tool
def _docs_tool() -> Any:
    """The retrieval tool of LangChain 1.x's RAG agent tutorial: it searches the vector
    store itself (no retriever run) and returns the documents as the tool's artifact."""
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore.from_texts(
        ["Paris is the capital of France.", "Berlin is the capital of Germany."],
        DeterministicFakeEmbedding(size=16))

    @tool(response_format="content_and_artifact")
    def retrieve_context(query: str) -> tuple[str, list[Document]]:
        """Retrieve information to help answer a query."""
        docs = store.similarity_search(query, k=2)
        return "\n\n".join(d.page_content for d in docs), docs

    return retrieve_context


def test_documents_a_tool_returns_as_its_artifact_are_the_contexts(session: Session) -> None:
    """Only retrievers' documents were contexts: an agent retrieving through such a tool
    had none, and every context feedback was skipped."""
    retrieve = _docs_tool()
    call = {"name": "retrieve_context", "args": {"query": "capital of France"}, "id": "c1",
            "type": "tool_call"}
    app = RunnableLambda(lambda q: retrieve.invoke(call), name="agent_step") | RunnableLambda(
        lambda message: f"Answer from: {message.content[:5]}")
    grounded = Feedback(lambda context: float("capital" in context),
                        name="grounded").on_contexts()
    with ChainRecorder(app, app_name="rag", feedbacks=[grounded],
                       session=session) as recording:
        app.invoke("capital of France?")
    record = recording.get()
    assert sorted(record.contexts) == ["Berlin is the capital of Germany.",
                                       "Paris is the capital of France."]
    result = record.wait_for_feedback_results(timeout=WAIT)[grounded]
    assert (result.status, result.result) == (FeedbackStatus.DONE, 1.0)
    # the same tool called without a tool call returns its text alone: no documents
    with ChainRecorder(retrieve, app_name="rag", session=session) as recording:
        retrieve.invoke({"query": "capital"})
    assert recording.get().contexts == []


def test_a_retriever_inside_a_retrieval_tool_does_not_repeat_contexts(
        session: Session) -> None:
    class Shelf(BaseRetriever):
        def _get_relevant_documents(self, query: str, **kwargs: Any) -> list[Document]:
            return [Document(page_content=f"shelf: {query}")]

    shelf = Shelf()

    @tool(response_format="content_and_artifact")
    def lookup(query: str) -> tuple[str, list[Document]]:
        """Look it up on the shelf."""
        docs = shelf.invoke(query)
        return docs[0].page_content, docs

    retrieve = _docs_tool()

    def call_tools(question: str) -> list[Any]:
        return [lookup.invoke({"name": "lookup", "args": {"query": "maps"}, "id": "c1",
                               "type": "tool_call"}),
                retrieve.invoke({"name": "retrieve_context", "args": {"query": "France"},
                                 "id": "c2", "type": "tool_call"})]

    app = RunnableLambda(call_tools)
    with ChainRecorder(app, app_name="agent", session=session) as recording:
        app.invoke("maps of France?")
    record = recording.get()
    assert sorted(record.contexts) == ["Berlin is the capital of Germany.",
                                       "Paris is the capital of France.", "shelf: maps"]
