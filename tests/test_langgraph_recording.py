"""LangGraph apps (compiled graphs are LangChain runnables): what a record's input and
output are, so that `.on_input()` / `.on_output()` feedbacks judge the question and the
answer rather than a whole graph state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.types import Command, interrupt
from typing_extensions import TypedDict

from scrutiny import Feedback, FeedbackStatus, RecordStatus, Session
from scrutiny.core import _rows
from scrutiny.integrations.langchain import ChainRecorder

ANSWER = "Dublin is mild and wet."


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    s = Session(f"sqlite:///{tmp_path}/graph.sqlite")
    yield s
    s.close()


def _text_checks() -> list[Feedback]:
    return [Feedback(lambda input: float(isinstance(input, str)), name="input_is_text")
            .on_input(),
            Feedback(lambda output: float(isinstance(output, str)), name="output_is_text")
            .on_output()]


class ChatState(MessagesState):
    user_id: str


def _chat_graph() -> Any:
    model = FakeListChatModel(responses=[ANSWER])

    def agent(state: ChatState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(ChatState)
    graph.add_node("agent", agent)
    graph.add_edge(START, "agent")
    graph.add_edge("agent", END)
    return graph.compile()


def _in_a_row(state: Any, *steps: Any, checkpointer: bool = True) -> Any:
    """A graph running `steps` (functions, named after themselves) one after another,
    with an in-memory checkpointer (so runs can pause and resume) unless told not to."""
    graph = StateGraph(state)
    previous = START
    for step in steps:
        graph.add_node(step.__name__, step)
        graph.add_edge(previous, step.__name__)
        previous = step.__name__
    graph.add_edge(previous, END)
    return graph.compile(checkpointer=InMemorySaver() if checkpointer else None)


@pytest.mark.parametrize("messages", [
    [("user", "What is the weather in Ireland?")],
    [{"role": "user", "content": "What is the weather in Ireland?"}],
], ids=["tuple", "role-dict"])
def test_a_chat_graphs_record_holds_the_question_and_the_last_messages_text(
        session: Session, messages: list[Any]) -> None:
    """A state with a key beside `messages` was stored whole as the output (the message
    history, every field), and LangGraph's message forms stayed lists as the input: text
    feedbacks failed or scored the wrong thing."""
    app = _chat_graph()
    fbs = _text_checks()
    recorder = ChainRecorder(app, app_name="chat", feedbacks=fbs, session=session)
    with recorder as recording:
        state = app.invoke({"messages": messages, "user_id": "u1"})
    record = recording.get()
    assert state["messages"][-1].content == ANSWER
    assert (record.input, record.output, record.status) == (
        "What is the weather in Ireland?", ANSWER, RecordStatus.OK)
    results = record.wait_for_feedback_results(timeout=10)
    assert [(r.status, r.result) for r in results.values()] == [
        (FeedbackStatus.DONE, 1.0), (FeedbackStatus.DONE, 1.0)]


class RagState(TypedDict):
    question: str
    documents: list[str]
    generation: str


def test_a_rag_graphs_output_is_its_generation(session: Session) -> None:
    def retrieve(state: RagState) -> dict[str, Any]:
        return {"documents": ["Ireland has a mild, wet climate."]}

    def generate(state: RagState) -> dict[str, Any]:
        return {"generation": ANSWER}

    graph = StateGraph(RagState)
    graph.add_node("retrieve", retrieve)
    graph.add_node("generate", generate)
    graph.add_edge(START, "retrieve")
    graph.add_edge("retrieve", "generate")
    graph.add_edge("generate", END)
    app = graph.compile()
    recorder = ChainRecorder(app, app_name="rag", session=session)
    with recorder as recording:
        app.invoke({"question": "Weather in Ireland?"})
    record = recording.get()
    assert (record.input, record.output) == ("Weather in Ireland?", ANSWER)


def _tool_loop() -> Any:
    """An agent step asking for a tool, the tool's answer, then the final answer."""
    def agent(state: MessagesState) -> dict[str, Any]:
        if isinstance(state["messages"][-1], ToolMessage):
            return {"messages": [AIMessage(content=ANSWER)]}
        return {"messages": [AIMessage(content="", tool_calls=[
            {"name": "weather", "args": {"city": "Dublin"}, "id": "c1"}])]}

    def tools(state: MessagesState) -> dict[str, Any]:
        return {"messages": [ToolMessage(content="Sunny in Dublin.", tool_call_id="c1")]}

    def route(state: MessagesState) -> str:
        return "tools" if state["messages"][-1].tool_calls else END  # type: ignore[attr-defined]

    graph = StateGraph(MessagesState)
    graph.add_node("agent", agent)
    graph.add_node("tools", tools)
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", route, ["tools", END])
    graph.add_edge("tools", "agent")
    return graph.compile()


def test_a_graph_stream_stopped_early_keeps_what_the_consumer_last_saw(
        session: Session) -> None:
    """LangGraph ends the root with no output and streams no tokens of its own: the
    record was `cancelled` with output None and every output feedback was skipped."""
    app = _tool_loop()
    fb = Feedback(lambda output: float(len(output) > 0), name="said").on_output()
    recorder = ChainRecorder(app, app_name="loop", feedbacks=[fb], session=session)
    with recorder as recording:
        stream = app.stream({"messages": [("user", "Weather in Dublin?")]},
                            stream_mode="updates")
        seen = [next(stream), next(stream)]
        stream.close()
    record = recording.get()
    assert [list(update) for update in seen] == [["agent"], ["tools"]]
    assert record.status is RecordStatus.CANCELLED
    assert record.output == "Sunny in Dublin."  # the last update the consumer saw
    result = record.wait_for_feedback_results(timeout=10)[fb]
    assert (result.status, result.result) == (FeedbackStatus.DONE, 1.0)


def test_a_resumed_run_records_the_answer_it_was_resumed_with(session: Session) -> None:
    """`invoke(Command(resume=...))` recorded the Command object as the input."""
    def ask(state: MessagesState) -> dict[str, Any]:
        approved = interrupt("Book the flight?")
        return {"messages": [AIMessage(content=f"Booked: {approved}")]}

    app = _in_a_row(MessagesState, ask)
    config: Any = {"configurable": {"thread_id": "t1"}}
    recorder = ChainRecorder(app, app_name="hitl", session=session)
    app.invoke({"messages": [("user", "Fly me to Dublin")]}, config)
    with recorder as recording:
        app.invoke(Command(resume="yes"), config)
    record = recording.get()
    assert (record.input, record.output) == ("yes", "Booked: yes")


def test_a_run_paused_by_interrupt_is_marked_interrupted(session: Session) -> None:
    """interrupt() makes invoke return normally: the pause was recorded as a finished
    answer, indistinguishable in filters and leaderboards."""
    def draft(state: RagState) -> dict[str, Any]:
        return {"generation": "draft answer"}

    def review(state: RagState) -> dict[str, Any]:
        verdict = interrupt({"approve": state["generation"]})
        return {"generation": f"{state['generation']} ({verdict})"}

    app = _in_a_row(RagState, draft, review)
    config: Any = {"configurable": {"thread_id": "t2"}}
    recorder = ChainRecorder(app, app_name="review", session=session)
    with recorder as paused:
        app.invoke({"question": "q1"}, config)
    with recorder as resumed:
        app.invoke(Command(resume="approved"), config)
    first, second = paused.get(), resumed.get()
    assert (first.tags, first.metadata["interrupted_at"]) == (["interrupted"], "review")
    assert (second.tags, second.output) == ([], "draft answer (approved)")
    assert "interrupted_at" not in second.metadata
    df, _ = session.get_records_and_feedback()
    assert sorted(map(list, df["tags"])) == [[], ["interrupted"]]


def test_a_stream_stopped_after_a_node_that_returned_a_command_keeps_its_update(
        session: Session) -> None:
    """Nodes that return `Command(update=..., goto=...)` (hand-offs, and every model step
    of LangChain's `create_agent`, as a list of them): a stream stopped after one kept the
    Command objects as the output, and feedbacks judged them (or None, for one alone)."""
    def triage(state: MessagesState) -> Command[Any]:
        return Command(update={"messages": [AIMessage(content="Handing you to billing.")]},
                       goto="billing")

    def billing(state: MessagesState) -> list[Command[Any]]:
        return [Command(update={"messages": [AIMessage(content="Your bill is 10 EUR.")]})]

    def goodbye(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage(content="Bye.")]}

    graph = StateGraph(MessagesState)
    graph.add_node("triage", triage, destinations=("billing",))
    graph.add_node("billing", billing)
    graph.add_node("goodbye", goodbye)
    graph.add_edge(START, "triage")
    graph.add_edge("billing", "goodbye")
    graph.add_edge("goodbye", END)
    app = graph.compile()
    checks = _text_checks()
    recorder = ChainRecorder(app, app_name="handoff", feedbacks=checks, session=session)
    with recorder as recording:
        for steps in (1, 2):
            stream = app.stream({"messages": [("user", "My bill?")]}, stream_mode="updates")
            assert [list(next(stream)) for _ in range(steps)] == [["triage"], ["billing"]][:steps]
            stream.close()
    after_triage, after_billing = recording.records
    assert after_triage.status is RecordStatus.CANCELLED
    assert after_triage.output == "Handing you to billing."
    assert after_billing.output == "Your bill is 10 EUR."
    for record in (after_triage, after_billing):
        results = record.wait_for_feedback_results(timeout=10)
        assert {(r.status, r.result) for r in results.values()} == {(FeedbackStatus.DONE, 1.0)}


def test_a_long_chat_is_stored_compressed_and_read_back_whole(tmp_path: Path) -> None:
    """Each node span of a chat graph with memory holds the conversation so far, so the
    stored spans grew with the square of the turns (4.5 MB for 60 turns). On SQLite long
    span trees are stored compressed; reading them back gives the same spans."""
    import contextlib
    import sqlite3

    reply = "The weather in Ireland is mild and wet, with frequent showers. " * 3
    model = FakeListChatModel(responses=[f"{i}: {reply}" for i in range(40)])

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    app = _in_a_row(MessagesState, agent)
    path = tmp_path / "chat.sqlite"
    config: Any = {"configurable": {"thread_id": "t1"}}
    with Session(f"sqlite:///{path}") as session:
        recorder = ChainRecorder(app, app_name="chat", session=session)
        for turn in range(40):
            with recorder as recording:
                app.invoke({"messages": [("user", f"Question {turn}: and tomorrow?")]}, config)
        last = recording.get()
        records = recorder.handler.records
        assert session.flush(30)
    assert len(records) == 40
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        stored = db.execute("SELECT sum(length(spans_json)) FROM scrutiny_records").fetchone()[0]
    whole = sum(len(_rows._spans_json(r.spans, 4_000_000)) for r in records)
    assert stored * 5 < whole, (stored, whole)
    with Session(f"sqlite:///{path}") as reader:
        back = reader.get_record(last.record_id)
    assert back is not None
    assert [(s.name, s.kind, s.inputs) for s in back.spans] == \
        [(s.name, s.kind, _rows._serialize.loads(_rows._serialize.dumps(s.inputs)))
         for s in last.spans]


def test_a_run_paused_before_it_answered_records_what_it_asked(session: Session) -> None:
    """A run paused by interrupt() before any answer recorded the user's own question as
    its output (the state's only text), and the pause's span error was the repr of
    LangGraph's Interrupt objects: what the run waits for was nowhere readable."""
    def clarify(state: RagState) -> dict[str, Any]:
        city = interrupt("Which city?")
        return {"generation": f"Trip to {city}"}

    app = _in_a_row(RagState, clarify)
    config: Any = {"configurable": {"thread_id": "t3"}}
    recorder = ChainRecorder(app, app_name="trip", session=session)
    with recorder as recording:
        result = app.invoke({"question": "Plan a trip"}, config)
    record = recording.get()
    assert [i.value for i in result["__interrupt__"]] == ["Which city?"]
    assert (record.input, record.output, record.tags) == (
        "Plan a trip", "Which city?", ["interrupted"])
    assert record.metadata["interrupt"] == "Which city?"
    node = next(s for s in record.spans if s.name == "clarify")
    assert node.error == "GraphInterrupt: paused for human input: Which city?"


def test_a_hand_off_to_the_parent_graph_is_not_an_error(session: Session) -> None:
    """`Command(graph=Command.PARENT, goto=...)` (multi-agent hand-offs) travels up as
    LangGraph's ParentCommand exception: the node, the subgraph and its node span each
    had `error="ParentCommand: Command(graph='sub:5f0c...', ...)"` in an `ok` record."""
    def triage(state: MessagesState) -> Command[Any]:
        return Command(graph=Command.PARENT, goto="billing",
                       update={"messages": [AIMessage(content="Handing you to billing.")]})

    team = StateGraph(MessagesState)
    team.add_node("triage", triage)
    team.add_edge(START, "triage")

    def billing(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage(content="Your bill is 10 EUR.")]}

    graph = StateGraph(MessagesState)
    graph.add_node("team", team.compile(), destinations=("billing",))
    graph.add_node("billing", billing)
    graph.add_edge(START, "team")
    graph.add_edge("billing", END)
    app = graph.compile()
    recorder = ChainRecorder(app, app_name="handoff", session=session)
    with recorder as recording:
        state = app.invoke({"messages": [("user", "My bill?")]})
    record = recording.get()
    assert state["messages"][-1].content == "Your bill is 10 EUR."
    assert (record.status, record.output) == (RecordStatus.OK, "Your bill is 10 EUR.")
    assert [s.error for s in record.spans] == [None] * len(record.spans)
    node = next(s for s in record.spans if s.name == "triage")
    assert node.outputs.goto == "billing"


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("run", ["invoke", "astream"])
def test_a_run_stopped_at_a_static_breakpoint_is_marked_interrupted(
        session: Session, when: str, run: str) -> None:
    """`compile(interrupt_before=[...])` / `interrupt_after` pause a run without raising in
    any step: the pause was recorded as a finished answer (the model's request for a tool
    it had not run yet), with no `interrupted` tag."""
    import asyncio

    app = _tool_loop_with(checkpointer=InMemorySaver(),
                          **{f"interrupt_{when}": ["tools" if when == "before" else "agent"]})
    config: Any = {"configurable": {"thread_id": f"{when}-{run}"}}
    question: Any = {"messages": [("user", "Weather in Dublin?")]}
    recorder = ChainRecorder(app, app_name="breakpoint", session=session)

    async def astream() -> None:
        async for _ in app.astream(question, config):
            pass

    with recorder as recording:
        if run == "invoke":
            app.invoke(question, config)
        else:
            asyncio.run(astream())
    record = recording.get()
    assert record.tags == ["interrupted"]
    assert record.metadata["breakpoint"] == f"interrupt_{when}"
    assert record.metadata["interrupted_at"] == ("tools" if when == "before" else "agent")
    with recorder as resumed:
        state = app.invoke(None, config)
    assert state["messages"][-1].content == ANSWER
    # (continued with invoke(None, config), its input was None: its input/output
    # feedbacks were skipped. It answers the thread's last user message.)
    assert resumed.get().input == "Weather in Dublin?"
    if when == "before":  # (interrupt_after pauses after the agent's final step too)
        assert resumed.get().tags == []
        assert resumed.get().output == ANSWER


def test_nodes_side_by_side_that_each_interrupt_are_all_in_the_record(
        session: Session) -> None:
    """The app gets every Interrupt of nodes run side by side; the record kept one (its
    output, metadata["interrupt"] and ["interrupted_at"] named one node)."""
    class Approvals(TypedDict, total=False):
        question: str
        refund: str
        email: str

    graph = StateGraph(Approvals)
    graph.add_node("approve_refund", lambda s: {"refund": interrupt("Refund $120?")})
    graph.add_node("approve_email", lambda s: {"email": interrupt("Send the email?")})
    for node in ("approve_refund", "approve_email"):
        graph.add_edge(START, node)
        graph.add_edge(node, END)
    app = graph.compile(checkpointer=InMemorySaver())
    with ChainRecorder(app, app_name="hitl", session=session) as recording:
        out = app.invoke({"question": "Refund my order"}, {"configurable": {"thread_id": "1"}})
    record = recording.get()
    asked = sorted(i.value for i in out["__interrupt__"])
    assert asked == ["Refund $120?", "Send the email?"]
    assert sorted(record.output) == sorted(record.metadata["interrupt"]) == asked
    assert sorted(record.metadata["interrupted_at"].split(", ")) == [
        "approve_email", "approve_refund"]
    assert record.tags == ["interrupted"]


def _tool_loop_with(**compile_kwargs: Any) -> Any:
    graph = _tool_loop().builder
    return graph.compile(**compile_kwargs)


def _answering_graph() -> Any:
    """One node that answers, and a route after it (as an agent's model step has: the
    node's writers are then two, which LangGraph runs as a run of their own)."""
    def answer(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage(content=ANSWER)]}

    graph = StateGraph(MessagesState)
    graph.add_node("answer", answer)
    graph.add_edge(START, "answer")
    graph.add_conditional_edges("answer", lambda state: END, [END])
    return graph.compile(checkpointer=InMemorySaver())


def test_a_state_edit_between_two_runs_is_no_record(session: Session) -> None:
    """`graph.update_state(config, values)` — a human's edit before the run resumes —
    became a record of its own (root span "LangGraphUpdateState", `ok`), judged by the
    app's feedbacks as if it were an answer and counted in the leaderboard."""
    app = _answering_graph()
    fb = Feedback(lambda output: 1.0, name="answered").on_output()
    config: Any = {"configurable": {"thread_id": "edit"}}
    recorder = ChainRecorder(app, app_name="edit", feedbacks=[fb], session=session)
    with recorder as recording:
        app.invoke({"messages": [("user", "Weather in Dublin?")]}, config)
        app.update_state(config, {"messages": [AIMessage(content="Edited by a human.")]})
        app.invoke({"messages": [("user", "And tomorrow?")]}, config)
    assert [r.spans[0].name for r in recording.records] == ["LangGraph", "LangGraph"]
    assert [r.input for r in recording.records] == ["Weather in Dublin?", "And tomorrow?"]
    assert session.flush(10)
    df, _ = session.get_records_and_feedback()
    assert len(df) == 2


async def test_an_async_state_edit_is_no_record(session: Session) -> None:
    app = _answering_graph()
    config: Any = {"configurable": {"thread_id": "aedit"}}
    async with ChainRecorder(app, app_name="aedit", session=session) as recording:
        await app.ainvoke({"messages": [("user", "Weather in Dublin?")]}, config)
        await app.aupdate_state(config, {"messages": [AIMessage(content="Edited.")]})
    assert [r.spans[0].name for r in recording.records] == ["LangGraph"]


class DraftState(TypedDict, total=False):
    question: str
    draft: str
    critique: str
    answer: str


def _fan_out() -> Any:
    """Two nodes in the same step (`draft` and `critique`), then `join`."""
    def draft(state: DraftState) -> dict[str, Any]:
        return {"draft": "A short draft answer."}

    def critique(state: DraftState) -> dict[str, Any]:
        return {"critique": "The draft is too short."}

    def join(state: DraftState) -> dict[str, Any]:
        return {"answer": f"{state['draft']} {state['critique']}"}

    graph = StateGraph(DraftState)
    for node in (draft, critique, join):
        graph.add_node(node.__name__, node)
    graph.add_edge(START, "draft")
    graph.add_edge(START, "critique")
    graph.add_edge(["draft", "critique"], "join")
    graph.add_edge("join", END)
    return graph.compile()


def test_a_graph_stream_stopped_after_a_fan_out_keeps_the_update_it_received(
        session: Session) -> None:
    """The consumer read one node's update of a step that ran two and stopped: the
    record's output was the other node's update (the later to finish), which it never
    received."""
    app = _fan_out()
    with ChainRecorder(app, app_name="fan-out", session=session) as recording:
        stream = app.stream({"question": "q"}, stream_mode="updates")
        first = next(stream)
        stream.close()
    (update,) = first.values()
    record = recording.get()
    assert record.status is RecordStatus.CANCELLED
    assert record.output == next(iter(update.values()))


async def test_an_async_graph_stream_stopped_keeps_the_chunk_it_received(
        session: Session) -> None:
    """The same for `astream`, whichever form its chunks take: a subgraph's update
    (`subgraphs=True`) left the output None, and the subgraph's steps said
    "CancelledError: <object object at 0x...>"."""
    class Inner(TypedDict, total=False):
        question: str
        answer: str
        checked: bool

    async def answer(state: Inner) -> dict[str, Any]:
        return {"answer": ANSWER}

    async def check(state: Inner) -> dict[str, Any]:
        await asyncio.Event().wait()  # (cancelled when the consumer stops)
        return {"checked": True}

    outer = StateGraph(Inner)
    outer.add_node("inner", _in_a_row(Inner, answer, check, checkpointer=False))
    outer.add_edge(START, "inner")
    outer.add_edge("inner", END)
    nested = outer.compile()
    fanned = _fan_out()
    for app, kwargs in ((fanned, {"stream_mode": "updates"}),
                        (fanned, {"stream_mode": ["updates", "custom"]}),
                        (nested, {"subgraphs": True})):
        async with ChainRecorder(app, app_name="astream", session=session) as recording:
            stream = app.astream({"question": "q"}, **kwargs)
            chunk = await anext(stream)
            await stream.aclose()
        update = chunk[-1] if isinstance(chunk, tuple) else chunk
        (values,) = update.values()
        record = recording.get()
        assert record.status is RecordStatus.CANCELLED, kwargs
        assert record.output == next(iter(values.values())), kwargs
        assert not [s.error for s in record.spans if "object object" in (s.error or "")]


def _streaming_chat(*, asynchronous: bool) -> Any:
    """A chat graph whose model streams "one two three four five six" token by token."""
    model = GenericFakeChatModel(messages=iter(["one two three four five six"] * 10))

    def call(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    async def acall(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    return _in_a_row(MessagesState, acall if asynchronous else call, checkpointer=False)


def test_a_messages_stream_stopped_early_keeps_the_text_the_consumer_received(
        session: Session) -> None:
    """`stream_mode="messages"` (token by token, as chat UIs read it), stopped after three
    tokens: LangGraph's model runs ahead of the consumer, and the record's output was the
    whole answer, judged by output feedbacks though the user never saw it."""
    app = _streaming_chat(asynchronous=False)
    with ChainRecorder(app, app_name="tokens", session=session) as recording:
        stream = app.stream({"messages": [("user", "count")]}, stream_mode="messages")
        seen = "".join(next(stream)[0].content for _ in range(3))
        stream.close()
    record = recording.get()
    assert (seen, record.status) == ("one two", RecordStatus.CANCELLED)
    assert record.output == seen


async def test_an_async_messages_stream_stopped_early_keeps_the_text_it_received(
        session: Session) -> None:
    app = _streaming_chat(asynchronous=True)
    for stop_after in (1, 3, 5):
        async with ChainRecorder(app, app_name="atokens", session=session) as recording:
            stream = app.astream({"messages": [("user", "count")]}, stream_mode="messages")
            parts = []
            async for message, _metadata in stream:
                parts.append(message.content)
                if len(parts) == stop_after:
                    break
            await stream.aclose()
        record = recording.get()
        assert record.output == "".join(parts), stop_after


class ModerationDown(RuntimeError):
    pass


def _answer_then_fail() -> Any:
    """`answer` answers (its update reaches a stream's consumer), then `moderate` fails."""
    model = FakeListChatModel(responses=[ANSWER])

    def answer(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    def moderate(state: MessagesState) -> dict[str, Any]:
        raise ModerationDown("moderation service down")

    return _in_a_row(MessagesState, answer, moderate, checkpointer=False)


def _collect(chunks: Iterator[Any], into: list[Any]) -> None:
    for chunk in chunks:
        into.append(chunk)


async def _acollect(chunks: AsyncIterator[Any], into: list[Any]) -> None:
    async for chunk in chunks:
        into.append(chunk)


@pytest.mark.parametrize("mode", ["updates", "values"])
async def test_a_graph_stream_that_fails_midway_keeps_what_the_caller_received(
        session: Session, mode: str) -> None:
    """The caller of a LangGraph stream had received the answer node's update when a
    later node failed: the `error` record kept no `metadata["partial_output"]` (the README
    promises what the caller received). An invoke that fails received nothing: none."""
    app = _answer_then_fail()
    question = {"messages": [("user", "Weather in Dublin?")]}
    recorder = ChainRecorder(app, app_name="fails", session=session)
    received: list[Any] = []
    with recorder as streamed, pytest.raises(ModerationDown):
        _collect(app.stream(question, stream_mode=mode), received)
    async with recorder as astreamed:
        with pytest.raises(ModerationDown):
            await _acollect(app.astream(question, stream_mode=mode), received)
    with recorder as invoked, pytest.raises(ModerationDown):
        app.invoke(question)
    async with recorder as ainvoked:
        with pytest.raises(ModerationDown):
            await app.ainvoke(question)
    assert ANSWER in str(received)
    for recording in (streamed, astreamed):
        record = recording.get()
        assert (record.status, record.output) == (RecordStatus.ERROR, None)
        assert record.metadata["partial_output"] == ANSWER
    for recording in (invoked, ainvoked):
        record = recording.get()
        assert record.status is RecordStatus.ERROR
        assert "partial_output" not in record.metadata


def test_a_run_paused_in_a_subgraph_names_the_subgraphs_node(session: Session) -> None:
    """interrupt() in a node of a subgraph: `interrupted_at` named the parent graph's node
    that runs the subgraph, not the node that asked."""
    def ask(state: RagState) -> dict[str, Any]:
        return {"generation": interrupt("Which city?")}

    outer = StateGraph(RagState)
    outer.add_node("research", _in_a_row(RagState, ask, checkpointer=False))
    outer.add_edge(START, "research")
    outer.add_edge("research", END)
    app = outer.compile(checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "sub"}}
    with ChainRecorder(app, app_name="sub", session=session) as recording:
        app.invoke({"question": "Weather?"}, config)
    record = recording.get()
    assert record.tags == ["interrupted"]
    assert (record.metadata["interrupted_at"], record.metadata["interrupt"]) == (
        "ask", "Which city?")


async def test_a_graph_event_stream_stopped_early_keeps_the_tokens_it_gave(
        session: Session) -> None:
    """`astream_events` gives its consumer the model's tokens as events, ahead of the
    graph's chunks: stopped after three, the record keeps those three (not the graph's
    last chunk, of which the consumer got none)."""
    app = _streaming_chat(asynchronous=True)
    async with ChainRecorder(app, app_name="events", session=session) as recording:
        events = app.astream_events({"messages": [("user", "count")]}, version="v2")
        tokens = []
        async for event in events:
            if event["event"] == "on_chat_model_stream":
                tokens.append(event["data"]["chunk"].content)
                if len(tokens) == 3:
                    break
        await events.aclose()
    record = recording.get()
    assert (record.status, record.output) == (RecordStatus.CANCELLED, "".join(tokens))


def test_a_tools_span_output_is_its_value_however_it_is_called(session: Session) -> None:
    """Called by an agent (a ToolNode) a tool's span output was the ToolMessage, called
    with its arguments its value: a feedback on Select.spans(kind="tool").outputs scored
    the message object ("sunny" in it: 0.0, done) one way and the text the other."""
    from langchain_core.tools import tool
    from langgraph.prebuilt import ToolNode

    from scrutiny import Select

    @tool
    def weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    sunny = Feedback(lambda out: float("sunny" in out), name="sunny").on(
        Select.spans(kind="tool").outputs.each())
    graph = StateGraph(MessagesState)
    graph.add_node("tools", ToolNode([weather]))
    graph.add_edge(START, "tools")
    graph.add_edge("tools", END)
    app = graph.compile()
    call = AIMessage(content="", tool_calls=[{"name": "weather", "args": {"city": "Oslo"},
                                              "id": "c1"}])
    with ChainRecorder(app, app_name="tools", feedbacks=[sunny], session=session) as by_agent:
        app.invoke({"messages": [call]})
    with ChainRecorder(weather, app_name="tool", feedbacks=[sunny], session=session) as direct:
        weather.invoke({"city": "Oslo"})
    for recording in (by_agent, direct):
        record = recording.get()
        [span] = record.spans_of_kind("tool")
        assert span.outputs == "sunny in Oslo"
        assert record.wait_for_feedback_results(timeout=10)[sunny].result == 1.0
    assert by_agent.get().spans_of_kind("tool")[0].metadata["tool_call_id"] == "c1"
