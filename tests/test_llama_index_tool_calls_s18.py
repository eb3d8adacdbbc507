"""A model call that asks for tools is recorded with the calls it asked for, not as an
empty answer: alone (`chat_with_tools`) and as an agent's model step, in the shapes model
integrations give them (``additional_kwargs["tool_calls"]``, ``ToolCallBlock`` blocks)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import ToolCallBlock
from llama_index.core.llms import ChatMessage, ChatResponse
from llama_index.core.tools import FunctionTool

from scrutiny import Feedback, FeedbackStatus, Session
from scrutiny.integrations.llama_index import LlamaIndexRecorder
from tests.support.llama_index_fixtures import _no_leaked_traces  # noqa: F401
from tests.test_llama_index_workflows import _AGENT_WARNINGS, ToolThenAnswer

WAIT = 10.0
CALL = '[tool call] multiply({"a": 6, "b": 7})'


def multiply(a: int, b: int) -> int:
    """Multiply two numbers."""
    return a * b


class OpenAIShaped(ToolThenAnswer):
    """Asks for its tool as OpenAI's API does: ``function`` with JSON arguments, and a
    word before the call."""

    def _respond(self, messages: Any, tools: Any = None) -> ChatResponse:
        call = {"id": "c1", "type": "function",
                "function": {"name": "multiply", "arguments": '{"a": 6, "b": 7}'}}
        return ChatResponse(message=ChatMessage(
            role="assistant", content="Let me work it out.",
            additional_kwargs={"tool_calls": [call]}))


class BlockShaped(ToolThenAnswer):
    """Asks for its tool in a ``ToolCallBlock`` (the content blocks of newer integrations)."""

    def _respond(self, messages: Any, tools: Any = None) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role="assistant", blocks=[ToolCallBlock(
            tool_call_id="c1", tool_name="multiply", tool_kwargs={"a": 6, "b": 7})]))


@pytest.mark.parametrize(("model", "expected"), [
    (ToolThenAnswer, CALL),
    (BlockShaped, CALL),
    (OpenAIShaped, "Let me work it out.\n" + CALL),
])
async def test_a_model_asking_for_a_tool_answers_the_call(session: Session, model: type,
                                                          expected: str) -> None:
    llm = model()
    seen: list[Any] = []

    def judged(output: Any) -> float:
        seen.append(output)
        return 1.0

    answer = Feedback(judged, name="answer").on_output()
    tools = [FunctionTool.from_defaults(multiply)]
    with LlamaIndexRecorder(llm, feedbacks=[answer], session=session) as recording:
        llm.chat_with_tools(tools, user_msg="6*7?")
        await llm.achat_with_tools(tools, user_msg="6*7?")
    assert [r.output for r in recording.records] == [expected, expected]
    for record in recording.records:
        outcome = record.wait_for_feedback_results(timeout=WAIT)[answer]
        assert outcome.status == FeedbackStatus.DONE
    assert seen == [expected, expected]
    stored = session.get_record(recording.records[0].record_id)
    assert stored is not None
    assert stored.output == expected


@pytest.mark.filterwarnings(*_AGENT_WARNINGS)  # (LlamaIndex's agents read __fields__)
async def test_an_agents_tool_call_step_shows_the_call(session: Session) -> None:
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(multiply)], llm=ToolThenAnswer())
    with LlamaIndexRecorder(agent, session=session) as recording:
        await agent.run(user_msg="6*7?")
    record = recording.get()
    models = [s.outputs for s in record.spans if s.kind == "chat_model"]
    assert models[0] == CALL
    assert models[-1] == "The answer is 42."
    assert record.output == "The answer is 42."


@pytest.mark.filterwarnings(*_AGENT_WARNINGS)
async def test_an_agents_structured_answer_is_the_records_output(session: Session) -> None:
    """With `structured_output_fn` (or `output_cls`) the caller uses the agent's
    `structured_response`; the record's output was the chat text beside it."""
    agent = FunctionAgent(tools=[], llm=ToolThenAnswer(answer="It is Paris."),
                          structured_output_fn=lambda messages: {"city": "Paris"})
    with LlamaIndexRecorder(agent, session=session) as recording:
        response = await agent.run(user_msg="Capital of France?")
    assert response.structured_response == {"city": "Paris"}
    assert recording.get().output == {"city": "Paris"}
    plain = FunctionAgent(tools=[], llm=ToolThenAnswer(answer="It is Paris."))
    with LlamaIndexRecorder(plain, session=session) as recording:
        await plain.run(user_msg="Capital of France?")
    assert recording.get().output == "It is Paris."  # (no structured answer: the text)
