"""LlamaIndex workflows and agents: a record holds the question and the answer (not the run's
internal state and stop event), a cancelled run is `cancelled`, nested blocks record once."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.llms import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step
from pydantic import PrivateAttr

from scrutiny import Feedback, FeedbackStatus, RecordStatus, Session
from scrutiny.integrations.llama_index import LlamaIndexRecorder
from tests.support.llama_index_fixtures import _no_leaked_traces  # noqa: F401


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    s = Session(f"sqlite:///{tmp_path}/wf.sqlite")
    yield s
    s.close()


class ToolThenAnswer(FunctionCallingLLM):
    """A function-calling model: asks for the first tool once, then answers."""

    answer: str = "The answer is 42."

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(is_function_calling_model=True, model_name="tool-then-answer")

    def _prepare_chat_with_tools(self, tools: Any, user_msg: Any = None,
                                 chat_history: Any = None, **kwargs: Any) -> dict[str, Any]:
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(user_msg if isinstance(user_msg, ChatMessage)
                            else ChatMessage(role="user", content=user_msg))
        return {"messages": messages, "tools": tools, **kwargs}

    def _respond(self, messages: Any, tools: Any = None) -> ChatResponse:
        if tools and not any(m.role == MessageRole.TOOL for m in messages):
            call = {"id": "c1", "name": tools[0].metadata.name, "args": {"a": 6, "b": 7}}
            return ChatResponse(message=ChatMessage(
                role="assistant", content="", additional_kwargs={"tool_calls": [call]}))
        return ChatResponse(message=ChatMessage(role="assistant", content=self.answer))

    def get_tool_calls_from_response(self, response: Any, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        calls = response.message.additional_kwargs.get("tool_calls", [])
        return [ToolSelection(tool_id=c["id"], tool_name=c["name"], tool_kwargs=c["args"])
                for c in calls]

    @llm_chat_callback()
    def chat(self, messages: Any, tools: Any = None, **kwargs: Any) -> ChatResponse:
        return self._respond(messages, tools)

    @llm_chat_callback()
    async def achat(self, messages: Any, tools: Any = None, **kwargs: Any) -> ChatResponse:
        return self._respond(messages, tools)

    @llm_chat_callback()
    def stream_chat(self, messages: Any, tools: Any = None, **kwargs: Any) -> Any:
        response = self._respond(messages, tools)
        return iter([response])

    @llm_chat_callback()
    async def astream_chat(self, messages: Any, tools: Any = None, **kwargs: Any) -> Any:
        response = self._respond(messages, tools)
        if response.message.content:
            response.delta = response.message.content

        async def gen() -> Any:
            yield response

        return gen()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        return CompletionResponse(text=self.answer)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        return CompletionResponse(text=self.answer)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        return iter([CompletionResponse(text=self.answer, delta=self.answer)])

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> Any:
        async def gen() -> Any:
            yield CompletionResponse(text=self.answer, delta=self.answer)

        return gen()


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def _question_and_answer() -> Feedback:
    return Feedback(lambda question, answer: float(
        isinstance(question, str) and isinstance(answer, str) and "42" in answer),
        name="qa").on_input_output()


# (LlamaIndex's workflows read a deprecated pydantic attribute when an agent is built)
@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20",
                            "ignore::pydantic.warnings.PydanticDeprecatedSince211")
async def test_an_agent_run_records_the_users_message_and_the_answer_text(
        session: Session) -> None:
    """The input was the run's internal state (`init_state`, `start_event`, `tags`) and
    the output a StopEvent: every input/output feedback failed."""
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(multiply)],
                          llm=ToolThenAnswer())
    qa = _question_and_answer()
    recorder = LlamaIndexRecorder(agent, app_name="agent", feedbacks=[qa], session=session)
    with recorder as recording:
        response = await agent.run(user_msg="What is 6 times 7?")
    record = recording.get()
    assert str(response) == "The answer is 42."
    assert (record.input, record.output, record.status) == (
        "What is 6 times 7?", "The answer is 42.", RecordStatus.OK)
    result = record.wait_for_feedback_results(timeout=10)[qa]
    assert (result.status, result.result) == (FeedbackStatus.DONE, 1.0)


@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20",
                            "ignore::pydantic.warnings.PydanticDeprecatedSince211")
async def test_an_agent_run_given_only_the_conversation_records_its_last_user_message(
        session: Session) -> None:
    """A stateless chat API runs the agent with `chat_history` and no `user_msg`: the
    input was the whole start event (its unset fields too), which a judge read as JSON."""
    from llama_index.core.llms import ChatMessage

    agent = FunctionAgent(tools=[FunctionTool.from_defaults(multiply)],
                          llm=ToolThenAnswer())
    qa = _question_and_answer()
    recorder = LlamaIndexRecorder(agent, app_name="agent", feedbacks=[qa], session=session)
    history = [ChatMessage(role="user", content="Hi."),
               ChatMessage(role="assistant", content="Hello! What can I do?"),
               ChatMessage(role="user", content="What is 6 times 7?")]
    with recorder as recording:
        await agent.run(chat_history=history)
    record = recording.get()
    assert (record.input, record.output) == ("What is 6 times 7?", "The answer is 42.")
    result = record.wait_for_feedback_results(timeout=10)[qa]
    assert (result.status, result.result) == (FeedbackStatus.DONE, 1.0)


class Shout(Workflow):
    @step
    async def answer(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=f"ANSWER: {ev.query.upper()}")


class Slow(Workflow):
    @step
    async def wait(self, ev: StartEvent) -> StopEvent:
        await asyncio.sleep(30)
        return StopEvent(result="never")


async def test_a_workflow_run_records_its_start_arguments_and_result(session: Session) -> None:
    workflow = Shout(timeout=10)
    recorder = LlamaIndexRecorder(workflow, app_name="wf", session=session)
    with recorder as recording:
        result = await workflow.run(query="hello world")
    record = recording.get()
    assert result == "ANSWER: HELLO WORLD"
    assert (record.input, record.output) == ("hello world", "ANSWER: HELLO WORLD")


async def test_a_workflow_run_cancelled_by_its_handler_is_cancelled(session: Session) -> None:
    """cancel_run() ends the run's span normally with no result: it was recorded `ok`."""
    workflow = Slow(timeout=None)
    recorder = LlamaIndexRecorder(workflow, app_name="slow", session=session)
    with recorder as recording:
        handler = workflow.run(query="please stop")
        await asyncio.sleep(0)  # (lets the run start its step)
        await handler.cancel_run()
        try:
            await handler
        except Exception as exc:  # what the caller gets: LlamaIndex's own exception
            raised: Exception | None = exc
        else:
            raised = None
    record = recording.get()
    assert type(raised).__name__ == "WorkflowCancelledByUser"
    assert record.status is RecordStatus.CANCELLED
    assert "workflow cancelled by user" in (record.error or "")


def test_nested_blocks_of_one_recorder_record_a_call_once(session: Session) -> None:
    """Each block made a record of the call: it was stored and judged twice."""
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import MockLLM

    index = VectorStoreIndex.from_documents([Document(text="Ireland is rainy.")],
                                            embed_model=MockEmbedding(embed_dim=8))
    engine = index.as_query_engine(llm=MockLLM())
    recorder = LlamaIndexRecorder(engine, app_name="nested", session=session)
    with recorder as outer, recorder as inner:
        engine.query("Is Ireland rainy?")
    assert (len(outer.records), len(inner.records)) == (0, 1)
    session.wait_for_feedback(10)
    df, _ = session.get_records_and_feedback()
    assert len(df) == 1


def test_a_models_chat_messages_give_the_last_user_message_as_input() -> None:
    """A recorded LLM (or structured LLM) called with chat messages had the message list
    as its input."""
    from scrutiny.integrations.llama_index._convert import main_input

    messages = [ChatMessage(role="system", content="Answer briefly."),
                ChatMessage(role="user", content="Which city is in France?"),
                ChatMessage(role="assistant", content="Paris.")]
    assert main_input({"messages": messages}) == "Which city is in France?"


class ReportStart(StartEvent):
    document_path: str
    language: str


class Report(Workflow):
    @step
    async def summarize(self, ev: ReportStart) -> StopEvent:
        return StopEvent(result=f"summary of {ev.document_path} in {ev.language}")


async def test_a_typed_start_events_fields_are_the_input(session: Session) -> None:
    """A StartEvent subclass keeps its values in declared fields, not in the free-form
    data the input was read from: the input was None."""
    workflow = Report(timeout=10)
    recorder = LlamaIndexRecorder(workflow, app_name="report", session=session)
    with recorder as recording:
        await workflow.run(start_event=ReportStart(document_path="/r.pdf", language="en"))
    record = recording.get()
    assert record.input == {"document_path": "/r.pdf", "language": "en"}
    assert record.output == "summary of /r.pdf in en"


class Answer(StopEvent):
    answer: str
    sources: list[str]


class Verdict(StopEvent):
    """A typed stop event that carries nothing but its result."""


class TypedAnswer(Workflow):
    @step
    async def answer(self, ev: StartEvent) -> Answer:
        return Answer(answer=f"Snow is white ({ev.query}).", sources=["doc-1"])


class TypedVerdict(Workflow):
    @step
    async def answer(self, ev: StartEvent) -> Verdict:
        return Verdict(result=f"{ev.query}: guilty")


@pytest.mark.parametrize(("workflow_class", "expected"), [
    (TypedAnswer, {"answer": "Snow is white (Who did it?).", "sources": ["doc-1"]}),
    (TypedVerdict, "Who did it?: guilty"),
])
async def test_a_typed_stop_events_values_are_the_output(
        session: Session, workflow_class: type[Workflow], expected: Any) -> None:
    """The run's result is a typed stop event itself (LlamaIndex's documented way to return
    a structured answer); the output was its `result`, None, and output feedbacks were
    skipped."""
    workflow = workflow_class(timeout=10)
    said = Feedback(lambda output: float(str(expected) in str(output)), name="said").on_output()
    recorder = LlamaIndexRecorder(workflow, app_name="typed", feedbacks=[said],
                                  session=session)
    with recorder as recording:
        result = await workflow.run(query="Who did it?")
    assert isinstance(result, Answer | Verdict)
    record = recording.get()
    assert (record.input, record.output) == ("Who did it?", expected)
    outcome = record.wait_for_feedback_results(timeout=10)[said]
    assert (outcome.status, outcome.result) == (FeedbackStatus.DONE, 1.0)


# ---------------------------------------------------------------------- streamed answers
WORDS = ("Snow ", "is ", "white.")


class StreamedAnswer(Workflow):
    """Answers with a stream rather than a text: `make(question)` gives the stop event's
    result (a query engine's or chat engine's streaming response, a token generator)."""

    def __init__(self, make: Callable[[str], Awaitable[Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.make = make

    @step
    async def answer(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=await self.make(ev.query))


def _snow_index() -> Any:
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding

    return VectorStoreIndex.from_documents(
        [Document(text="Snow is white."), Document(text="Grass is green.")],
        embed_model=MockEmbedding(embed_dim=8))


async def _words(question: str) -> Any:
    async def tokens() -> Any:
        for word in WORDS:
            yield word

    return tokens()


async def _words_sync(question: str) -> Any:
    return _iter_words()


def _iter_words() -> Any:
    yield from WORDS


async def _read_async(stream: Any) -> list[str]:
    return [t async for t in stream]


async def _read_list(stream: Any) -> list[str]:
    return list(stream)


def _stream_kinds() -> dict[str, tuple[Any, Any]]:
    """name -> (make the stream from an index, read the workflow's result)."""
    from llama_index.core.llms import MockLLM
    from llama_index.core.memory import ChatMemoryBuffer

    def query_engine(index: Any) -> Any:
        return index.as_query_engine(streaming=True, llm=MockLLM(max_tokens=6),
                                     similarity_top_k=1)

    async def read_sync(result: Any) -> list[str]:
        return list(result.response_gen)

    async def read_response_gen(result: Any) -> list[str]:
        return await _read_async(result.async_response_gen())

    def sync_query(index: Any) -> Any:
        engine = query_engine(index)

        async def make(question: str) -> Any:
            return engine.query(question)
        return make

    def async_query(index: Any) -> Any:
        return query_engine(index).aquery

    def model(index: Any) -> Any:
        return MockLLM(max_tokens=5).astream_complete

    async def read_deltas(result: Any) -> list[str]:
        return [r.delta async for r in result]

    def chat(index: Any) -> Any:
        return index.as_chat_engine(
            chat_mode="context", llm=MockLLM(max_tokens=6), similarity_top_k=1,
            memory=ChatMemoryBuffer.from_defaults(token_limit=4000)).astream_chat

    return {
        "query_engine_stream": (sync_query, read_sync),
        "async_query_engine_stream": (async_query, read_response_gen),
        "chat_engine_stream": (chat, read_response_gen),
        "token_generator": (lambda index: _words, _read_async),
        "sync_token_generator": (lambda index: _words_sync, _read_list),
        "model_stream": (model, read_deltas),  # (responses: their deltas are the text)
    }


class SourcedStop(StopEvent):
    sources: list[str]


class SourcedStream(Workflow):
    """Ends with a typed stop event that carries a stream (its result) and a field."""

    def __init__(self, make: Callable[[str], Awaitable[Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.make = make

    @step
    async def answer(self, ev: StartEvent) -> SourcedStop:
        return SourcedStop(result=await self.make(ev.query), sources=["doc-1"])


@pytest.mark.parametrize("kind", ["token_generator", "sync_token_generator",
                                  "query_engine_stream"])
async def test_a_typed_stop_event_carrying_a_stream_is_recorded_with_its_text(
        session: Session, kind: str) -> None:
    """Since a typed stop event's output became its values, one whose result is a stream
    was no longer followed: the output was a dict holding the generator, the tokens
    were lost and output feedbacks judged the generator's description."""
    make, read = _stream_kinds()[kind]
    workflow = SourcedStream(make(_snow_index()), timeout=10)
    recorder = LlamaIndexRecorder(workflow, app_name="sourced", session=session)
    async with recorder as recording:
        result = await workflow.run(query="What color is snow?")
        tokens = await read(result.result)  # (the stream the event carries)
    record = recording.get()
    assert record.status is RecordStatus.OK
    assert record.output == "".join(tokens)


@pytest.mark.parametrize("kind", sorted(_stream_kinds()))
async def test_a_workflow_answering_with_a_stream_is_recorded_once_it_is_read(
        session: Session, kind: str) -> None:
    """The record was made when the run ended, before the stream was read: its output was
    the stream's repr and its tokens were missing."""
    make, read = _stream_kinds()[kind]
    workflow = StreamedAnswer(make(_snow_index()), timeout=10)
    length = Feedback(lambda output: float(len(output) > 0), name="said_something").on_output()
    recorder = LlamaIndexRecorder(workflow, app_name="streamed", feedbacks=[length],
                                  session=session)
    async with recorder as recording:
        result = await workflow.run(query="What color is snow?")
        if kind != "chat_engine_stream":  # (a chat engine writes its stream by itself)
            assert (recording.records, recording.open_calls) == ([], 1)
        tokens = await read(result)
    record = recording.get()
    assert tokens
    assert (record.input, record.output, record.status) == (
        "What color is snow?", "".join(tokens), RecordStatus.OK)
    root = record.root_span()
    assert root is not None
    assert (root.name, root.outputs) == ("StreamedAnswer.run", record.output)
    if kind.endswith("engine_stream"):
        assert len(record.contexts) == 1  # what the answer was written from
        assert record.contexts == [n.node.get_content() for n in result.source_nodes]
        models = [s for s in record.spans if s.name.startswith("MockLLM.")]
        assert models  # the model streamed after the run ended: still inside its record
    result_ = record.wait_for_feedback_results(timeout=10)[length]
    assert (result_.status, result_.result) == (FeedbackStatus.DONE, 1.0)


@pytest.mark.parametrize("kind", sorted(_stream_kinds()))
async def test_a_workflows_stream_read_from_the_stop_event_it_streamed_is_recorded(
        session: Session, kind: str) -> None:
    """Read from `handler.stream_events()` (LlamaIndex's streaming loop), the stop event
    came with the stream as the step made it, not the one that collects the tokens: the
    record was `cancelled` with output '' although the caller read it all."""
    make, read = _stream_kinds()[kind]
    workflow = StreamedAnswer(make(_snow_index()), timeout=10)
    length = Feedback(lambda output: float(len(output) > 0), name="said_something").on_output()
    recorder = LlamaIndexRecorder(workflow, app_name="streamed", feedbacks=[length],
                                  session=session)
    tokens: list[str] = []
    async with recorder as recording:
        handler = workflow.run(query="What color is snow?")
        async for event in handler.stream_events():
            if isinstance(event, StopEvent):
                tokens = await read(event.result)
        await handler
    record = recording.get()
    assert tokens
    assert (record.output, record.status, record.error) == (
        "".join(tokens), RecordStatus.OK, None)
    result = record.wait_for_feedback_results(timeout=10)[length]
    assert (result.status, result.result) == (FeedbackStatus.DONE, 1.0)


@pytest.mark.parametrize("kind", ["async_query_engine_stream", "token_generator",
                                  "sync_token_generator"])
async def test_a_workflows_stream_never_read_still_gives_its_record(
        session: Session, kind: str) -> None:
    """Dropped unread, the stream still ends its record (`cancelled`, with what is known)."""
    make, _ = _stream_kinds()[kind]
    workflow = StreamedAnswer(make(_snow_index()), timeout=10)
    recorder = LlamaIndexRecorder(workflow, app_name="unread", session=session)
    async with recorder as recording:
        result = await workflow.run(query="What color is snow?")
        assert recording.open_calls == 1
        del result
    gc.collect()  # (the run's handler keeps its result in a reference cycle)
    record = recording.get()
    assert (record.input, record.output, record.status) == (
        "What color is snow?", "", RecordStatus.CANCELLED)
    assert "stopped the stream" in (record.error or "")
    session.wait_for_feedback(10)
    df, _ = session.get_records_and_feedback()
    assert list(df["status"]) == ["cancelled"]


async def test_a_workflows_stream_read_in_part_is_cancelled_with_the_partial_text(
        session: Session) -> None:
    workflow = StreamedAnswer(_words, timeout=10)
    async with LlamaIndexRecorder(workflow, app_name="part", session=session) as recording:
        result = await workflow.run(query="What color is snow?")
        first = await result.__anext__()
        await result.aclose()
    record = recording.get()
    assert (record.output, record.status) == (first, RecordStatus.CANCELLED)


# ---------------------------------------------------------------------- agents of a workflow
class HandsOff(ToolThenAnswer):
    """A router's model: hands the conversation to `to_agent` (its handoff tool)."""

    to_agent: str = "calc"

    def _respond(self, messages: Any, tools: Any = None) -> ChatResponse:
        call = {"id": "h1", "name": "handoff",
                "args": {"to_agent": self.to_agent, "reason": "it is arithmetic"}}
        return ChatResponse(message=ChatMessage(
            role="assistant", content="", additional_kwargs={"tool_calls": [call]}))


class Broken(ToolThenAnswer):
    """A model that is down."""

    def _respond(self, messages: Any, tools: Any = None) -> ChatResponse:
        raise RuntimeError("model down")


def _calc() -> FunctionAgent:
    return FunctionAgent(name="calc", description="Does arithmetic.",
                         tools=[FunctionTool.from_defaults(multiply)], llm=ToolThenAnswer())


def _models(record: Any) -> set[str]:
    return {s.name.partition(".")[0] for s in record.spans if s.kind == "chat_model"}


_AGENT_WARNINGS = ("ignore::pydantic.warnings.PydanticDeprecatedSince20",
                   "ignore::pydantic.warnings.PydanticDeprecatedSince211")


@pytest.mark.filterwarnings(*_AGENT_WARNINGS)
async def test_a_recorded_agent_inside_an_agent_workflow_records_its_turn(
        session: Session) -> None:
    """The agent's calls were the workflow's steps, not calls of the agent: nothing was
    recorded."""
    from llama_index.core.agent.workflow import AgentWorkflow

    calc = _calc()
    workflow = AgentWorkflow(agents=[calc], timeout=10)
    qa = _question_and_answer()
    recorder = LlamaIndexRecorder(calc, app_name="calc", feedbacks=[qa], session=session)
    with recorder as recording:
        response = await workflow.run(user_msg="What is 6 times 7?")
    record = recording.get()
    assert str(response) == "The answer is 42."
    assert (record.input, record.output, record.status) == (
        "What is 6 times 7?", "The answer is 42.", RecordStatus.OK)
    root = record.root_span()
    assert root is not None
    assert (root.name, root.metadata["agent_name"]) == ("FunctionAgent.turn", "calc")
    names = {s.name for s in record.spans}
    assert {"AgentWorkflow.run_agent_step", "AgentWorkflow.call_tool", "FunctionTool.acall",
            "ToolThenAnswer.astream_chat"} <= names
    assert "AgentWorkflow.init_run" not in names  # (the workflow's, before the turn)
    by_id = {s.span_id: s for s in record.spans}
    assert all(s.parent_id in by_id for s in record.spans if s is not root)
    tool = next(s for s in record.spans if s.name == "FunctionTool.acall")
    assert "42" in str(tool.outputs)
    result = record.wait_for_feedback_results(timeout=10)[qa]
    assert (result.status, result.result) == (FeedbackStatus.DONE, 1.0)


@pytest.mark.filterwarnings(*_AGENT_WARNINGS)
async def test_each_recorded_agent_of_a_multi_agent_workflow_records_its_own_turn(
        session: Session) -> None:
    from llama_index.core.agent.workflow import AgentWorkflow

    router = FunctionAgent(name="router", description="Routes questions.", llm=HandsOff(),
                           can_handoff_to=["calc"])
    calc = _calc()
    idle = FunctionAgent(name="idle", description="Never asked.", llm=ToolThenAnswer())
    workflow = AgentWorkflow(agents=[router, calc, idle], root_agent="router", timeout=10)
    recorders = {name: LlamaIndexRecorder(app, app_name=name, session=session)
                 for name, app in [("router", router), ("calc", calc), ("idle", idle),
                                   ("workflow", workflow)]}
    with recorders["router"] as routed, recorders["calc"] as calculated, \
            recorders["idle"] as idled, recorders["workflow"] as whole:
        response = await workflow.run(user_msg="What is 6 times 7?")
    assert str(response) == "The answer is 42."
    turn, answer, run = routed.get(), calculated.get(), whole.get()
    assert (idled.records, idled.open_calls) == ([], 0)  # it took no turn
    assert (turn.input, turn.status) == ("What is 6 times 7?", RecordStatus.OK)
    assert turn.output == ('[tool call] handoff({"to_agent": "calc", '
                           '"reason": "it is arithmetic"})')
    assert (answer.input, answer.output) == ("What is 6 times 7?", "The answer is 42.")
    assert (run.input, run.output) == ("What is 6 times 7?", "The answer is 42.")
    # each turn holds its own agent's model calls; the run holds both
    assert _models(turn) == {"HandsOff"}
    assert _models(answer) == {"ToolThenAnswer"}
    assert _models(run) == {"HandsOff", "ToolThenAnswer"}
    assert turn.end_time <= answer.start_time
    session.wait_for_feedback(10)
    df, _ = session.get_records_and_feedback()
    assert sorted(df["app_name"]) == ["calc", "router", "workflow"]


@pytest.mark.filterwarnings(*_AGENT_WARNINGS)
async def test_a_turn_ended_by_a_failing_run_is_recorded_as_an_error(
        session: Session) -> None:
    from llama_index.core.agent.workflow import AgentWorkflow

    agent = FunctionAgent(name="down", description="Broken.", llm=Broken())
    workflow = AgentWorkflow(agents=[agent], timeout=10)
    recorder = LlamaIndexRecorder(agent, app_name="down", session=session)
    with recorder as recording, pytest.raises(Exception, match="model down"):
        await workflow.run(user_msg="Anyone there?")
    record = recording.get()
    assert (record.input, record.status) == ("Anyone there?", RecordStatus.ERROR)
    assert "model down" in (record.error or "")


@pytest.mark.filterwarnings(*_AGENT_WARNINGS)
async def test_concurrent_runs_give_one_turn_record_each(session: Session) -> None:
    from llama_index.core.agent.workflow import AgentWorkflow

    calc = _calc()
    workflow = AgentWorkflow(agents=[calc], timeout=10)
    questions = [f"What is 6 times 7, take {i}?" for i in range(4)]
    with LlamaIndexRecorder(calc, app_name="calc", session=session) as recording:
        await asyncio.gather(*(workflow.run(user_msg=q) for q in questions))
    assert sorted((r.input, r.output) for r in recording.records) == [
        (q, "The answer is 42.") for q in questions]


class Stalls(ToolThenAnswer):
    """A model that never answers; `started` is set once it has been called."""

    _started: asyncio.Event = PrivateAttr(default_factory=asyncio.Event)

    @llm_chat_callback()
    async def astream_chat(self, messages: Any, tools: Any = None, **kwargs: Any) -> Any:
        self._started.set()
        await asyncio.Event().wait()


@pytest.mark.filterwarnings(*_AGENT_WARNINGS)
async def test_a_turn_of_a_cancelled_run_is_cancelled(session: Session) -> None:
    from llama_index.core.agent.workflow import AgentWorkflow

    llm = Stalls()
    agent = FunctionAgent(name="stalls", description="Stalls.", llm=llm)
    workflow = AgentWorkflow(agents=[agent], timeout=None)
    with LlamaIndexRecorder(agent, app_name="stalls", session=session) as recording:
        handler = workflow.run(user_msg="Still there?")
        await asyncio.wait_for(llm._started.wait(), timeout=10)
        await handler.cancel_run()
        with pytest.raises(Exception) as raised:  # (LlamaIndex's own exception)
            await handler
    record = recording.get()
    assert type(raised.value).__name__ == "WorkflowCancelledByUser"
    assert (record.input, record.status) == ("Still there?", RecordStatus.CANCELLED)
    assert "workflow cancelled by user" in (record.error or "")
