"""`Select.spans(kind="llm")` selects each model call once, also a `CustomLLM`'s async or
streaming call (MockLLM, local-model wrappers), whose `astream_*` reads its `stream_*` after
its own span ended: two sibling spans of one call, both selected before."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

from scrutiny import Feedback, FeedbackStatus, Select, Session
from scrutiny.integrations.llama_index import LlamaIndexRecorder
from tests.support.llama_index_fixtures import _no_leaked_traces  # noqa: F401

WAIT = 10.0
CALLS = Select.spans(kind="llm")


class StreamsFromTheModel(Workflow):
    def __init__(self, llm: Any) -> None:
        super().__init__(timeout=10)
        self.llm = llm

    @step
    async def work(self, ev: StartEvent) -> StopEvent:
        text = ""
        async for chunk in await self.llm.astream_complete(ev.query):
            text += chunk.delta
        return StopEvent(result=text)


def _judged_calls(session: Session, recording: Any) -> list[Any]:
    """The model outputs a feedback on every model call was given, and those selected in
    the stored record."""
    record = recording.get()
    outcome = record.wait_for_feedback_results(timeout=WAIT)
    given = next(iter(outcome.values()))
    assert given.status == FeedbackStatus.DONE
    stored = session.get_record(record.record_id)
    assert stored is not None
    assert len(CALLS.select(stored)) == given.result
    return list(CALLS.select(record))


def _counted() -> Feedback:
    return Feedback(lambda outputs: float(len(outputs)), name="calls").on(
        CALLS.outputs.collect())


async def test_a_workflow_step_streaming_from_a_custom_llm_is_one_model_call(
        session: Session) -> None:
    wf = StreamsFromTheModel(MockLLM(max_tokens=4))
    with LlamaIndexRecorder(wf, feedbacks=[_counted()], session=session) as recording:
        await wf.run(query="hello")
    calls = _judged_calls(session, recording)
    assert [s.name for s in calls] == ["MockLLM.stream_complete"]


async def test_an_async_streaming_query_is_one_model_call(session: Session) -> None:
    index = VectorStoreIndex.from_documents(
        [Document(text="Paris is the capital of France.")],
        embed_model=MockEmbedding(embed_dim=8))
    engine = index.as_query_engine(streaming=True, similarity_top_k=1,
                                   llm=MockLLM(max_tokens=4))
    with LlamaIndexRecorder(engine, feedbacks=[_counted()], session=session) as recording:
        response = await engine.aquery("capital?")
        async for _ in response.async_response_gen():
            pass
    calls = _judged_calls(session, recording)
    assert [s.name for s in calls] == ["MockLLM.stream_complete"]


@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20",
                            "ignore::pydantic.warnings.PydanticDeprecatedSince211",
                            "ignore:is_running called from within a step")
async def test_a_react_agents_two_model_calls_are_selected_twice(session: Session) -> None:
    """A ReAct agent over a `CustomLLM` that reports usage: each step's `astream_chat`
    reads `stream_chat` (which wraps `stream_complete`)."""
    from llama_index.core.agent.workflow import ReActAgent
    from llama_index.core.tools import FunctionTool

    from tests.test_llama_index_shapes import USAGE, Scripted

    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    agent = ReActAgent(tools=[FunctionTool.from_defaults(multiply)], llm=Scripted(usage=USAGE))
    with LlamaIndexRecorder(agent, feedbacks=[_counted()], session=session) as recording:
        await agent.run(user_msg="What is 6 times 7?")
    calls = _judged_calls(session, recording)
    assert [s.name for s in calls] == ["Scripted.stream_complete"] * 2
