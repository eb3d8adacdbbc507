"""Human-in-the-loop workflows: a run resumed from a saved context (across requests) has
the human's response (or the question it runs again with) as its input, not the runtime's
state; a run cancelled while it waits for input says so; a step waiting with
`ctx.wait_for_event` is no failed span."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import (
    Context,
    HumanResponseEvent,
    InputRequiredEvent,
    StartEvent,
    StopEvent,
    Workflow,
    step,
)

from scrutiny import Feedback, FeedbackStatus, RecordStatus, Session
from scrutiny.integrations.llama_index import LlamaIndexRecorder
from tests.support.llama_index_fixtures import _no_leaked_traces  # noqa: F401
from tests.test_llama_index_workflows import _AGENT_WARNINGS, ToolThenAnswer

WAIT = 10.0


class AsksAStep(Workflow):
    @step
    async def ask(self, ctx: Context, ev: StartEvent) -> InputRequiredEvent:
        return InputRequiredEvent(prefix="What is your name?")

    @step
    async def greet(self, ctx: Context, ev: HumanResponseEvent) -> StopEvent:
        return StopEvent(result="hello " + ev.response)


class WaitsInAStep(Workflow):
    @step
    async def work(self, ctx: Context, ev: StartEvent) -> StopEvent:
        answer = await ctx.wait_for_event(HumanResponseEvent, waiter_id="ok",
                                          waiter_event=InputRequiredEvent(prefix="ok?"))
        return StopEvent(result=f"{ev.query}: {answer.response}")


async def _pause(recorder: LlamaIndexRecorder, wf: Workflow) -> tuple[object, dict]:
    """Request 1: run until the workflow asks, save its context, cancel the run."""
    with recorder as recording:
        handler = wf.run(query="greet me")
        async for event in handler.stream_events():
            if isinstance(event, InputRequiredEvent):
                break
        saved = handler.ctx.to_dict()
        await handler.cancel_run()
    return recording.get(), saved


async def _resume(recorder: LlamaIndexRecorder, wf: Workflow, saved: dict) -> object:
    """Request 2: resume from the saved context with the human's response."""
    with recorder as recording:
        handler = wf.run(ctx=Context.from_dict(wf, saved))
        handler.ctx.send_event(HumanResponseEvent(response="bob"))
        await handler
    return recording.get()


@pytest.mark.parametrize(("workflow", "asked", "question", "answer"), [
    (AsksAStep, "What is your name?", "bob", "hello bob"),
    (WaitsInAStep, "ok?", "greet me", "greet me: bob"),
])
async def test_a_run_resumed_across_requests_is_asked_what_a_user_would_name(
        session: Session, workflow: type, asked: str, question: str, answer: str) -> None:
    wf = workflow(timeout=10)
    given: list[object] = []

    def recorded(text: object) -> float:
        given.append(text)
        return 1.0

    on_input = Feedback(recorded, name="asked").on_input()
    recorder = LlamaIndexRecorder(wf, feedbacks=[on_input], session=session)
    paused, saved = await _pause(recorder, wf)
    assert paused.status == RecordStatus.CANCELLED
    if workflow is AsksAStep:  # (a step waiting itself ends with no sign of it)
        assert "interrupted" in paused.tags
        assert paused.metadata["interrupt"] == asked
    assert not [s.error for s in paused.spans if s is not paused.spans[0] and s.error]

    resumed = await _resume(recorder, wf, saved)
    assert (resumed.status, resumed.input, resumed.output) == (RecordStatus.OK, question,
                                                              answer)
    assert "interrupted" not in resumed.tags
    outcome = resumed.wait_for_feedback_results(timeout=WAIT)[on_input]
    assert outcome.status == FeedbackStatus.DONE
    assert given[-1] == question
    stored = session.get_record(resumed.record_id)
    assert stored is not None
    assert stored.input == question


async def approved(ctx: Context, a: int, b: int) -> str:
    """Multiply, once a human approves."""
    ev = await ctx.wait_for_event(HumanResponseEvent, waiter_id="approve",
                                  waiter_event=InputRequiredEvent(prefix="approve?"))
    return f"approved={ev.response} result={a * b}"


approved.__annotations__["ctx"] = Context  # (LlamaIndex finds the context by its type)


@pytest.mark.filterwarnings(*_AGENT_WARNINGS)
async def test_a_tool_waiting_for_a_human_is_no_failed_span(session: Session) -> None:
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(async_fn=approved)],
                          llm=ToolThenAnswer())
    with LlamaIndexRecorder(agent, session=session) as recording:
        handler = agent.run(user_msg="do it")
        async for event in handler.stream_events():
            if isinstance(event, InputRequiredEvent):
                handler.ctx.send_event(HumanResponseEvent(response="yes"))
        await handler
    record = recording.get()
    assert record.status == RecordStatus.OK
    assert [(s.name, s.error) for s in record.spans if s.error] == []
    waited = [s for s in record.spans if s.metadata.get("waiting_for")]
    assert waited
    assert waited[0].metadata["waiting_for"] == "HumanResponseEvent"
    assert "interrupted" not in record.tags
