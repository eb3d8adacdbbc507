"""LlamaIndex workflows and agents: a record holds the question and the answer (not the run's
internal state and stop event), a cancelled run is `cancelled`, nested blocks record once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
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
