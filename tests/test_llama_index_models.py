"""A function-calling model recorded alone: one call of the model's API is one record,
whatever helpers of the model's own it goes through, also a stream of structured answers
whose model calls are made as it is read."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import PromptTemplate
from llama_index.core.llms import ChatMessage, ChatResponse
from llama_index.core.llms.callbacks import llm_chat_callback
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel

from scrutiny import Feedback, FeedbackStatus, RecordStatus, Session
from scrutiny.integrations.llama_index import LlamaIndexRecorder
from tests.support.llama_index_fixtures import _no_leaked_traces  # noqa: F401
from tests.test_llama_index_workflows import ToolThenAnswer

WAIT = 10.0
USAGE = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}


class ColourModel(ToolThenAnswer):
    """Answers every chat with a call of its first tool, ``{"name": "blue"}``; streamed, the
    call's arguments come in two chunks (as hosted models stream them)."""

    @staticmethod
    def _chunks(tools: Any) -> list[ChatResponse]:
        name = tools[0].metadata.name if tools else "answer"
        return [ChatResponse(message=ChatMessage(role="assistant", content="",
                                                 additional_kwargs={"tool_calls": [
                                                     {"id": "c1", "name": name, "args": args}]}),
                             delta="", raw={"usage": USAGE})
                for args in ({}, {"name": "blue"})]

    def _respond(self, messages: Any, tools: Any = None) -> ChatResponse:
        return self._chunks(tools)[-1]

    @llm_chat_callback()
    def stream_chat(self, messages: Any, tools: Any = None, **kwargs: Any) -> Any:
        chunks = self._chunks(tools)

        def gen() -> Any:
            yield from chunks

        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Any, tools: Any = None, **kwargs: Any) -> Any:
        chunks = self._chunks(tools)

        async def gen() -> Any:
            for chunk in chunks:
                yield chunk

        return gen()


def paint(name: str) -> str:
    """Paint the sky in a colour."""
    return name


@pytest.mark.parametrize("call", ["chat_with_tools", "achat_with_tools"])
async def test_chat_with_tools_is_one_record(session: Session, call: str) -> None:
    """The model's `_prepare_chat_with_tools` helper (a span: LlamaIndex wraps every
    implementation of an abstract method) was a second record, judged on a dict."""
    llm = ColourModel()
    asked = Feedback(lambda question: float(question == "What colour is the sky?"),
                     name="asked").on_input()
    tools = [FunctionTool.from_defaults(paint)]
    with LlamaIndexRecorder(llm, feedbacks=[asked], session=session) as recording:
        if call == "chat_with_tools":
            response = llm.chat_with_tools(tools, user_msg="What colour is the sky?")
        else:
            response = await llm.achat_with_tools(tools, user_msg="What colour is the sky?")
    assert llm.get_tool_calls_from_response(response)[0].tool_kwargs == {"name": "blue"}
    record = recording.get()
    method = "chat" if call == "chat_with_tools" else "achat"
    assert [s.name for s in record.spans] == [f"ColourModel.{method}"]
    assert (record.input, record.status) == ("What colour is the sky?", RecordStatus.OK)
    outcome = record.wait_for_feedback_results(timeout=WAIT)[asked]
    assert (outcome.status, outcome.result) == (FeedbackStatus.DONE, 1.0)


class Colour(BaseModel):
    name: str


async def _read_structured(llm: ColourModel, call: str) -> list[Any]:
    template = PromptTemplate("What colour is the {thing}?")
    if call == "stream_structured_predict":
        return list(llm.stream_structured_predict(Colour, template, thing="sky"))
    stream = await llm.astream_structured_predict(Colour, template, thing="sky")
    return [part async for part in stream]


@pytest.mark.parametrize("call", ["stream_structured_predict", "astream_structured_predict"])
async def test_a_stream_of_structured_answers_is_one_record_of_the_last_answer(
        session: Session, call: str) -> None:
    """The stream's model calls, made as it is read, were records of their own, and its
    own record had output None and the template, unformatted, as input."""
    llm = ColourModel()
    blue = Feedback(lambda output: float("blue" in str(output)), name="blue").on_output()
    with LlamaIndexRecorder(llm, feedbacks=[blue], session=session) as recording:
        parts = await _read_structured(llm, call)
    assert parts[-1] == Colour(name="blue")
    record = recording.get()
    assert record.root_span().name == f"ColourModel.{call}"  # type: ignore[union-attr]
    assert (record.input, record.output, record.status) == (
        "What colour is the sky?", parts[-1], RecordStatus.OK)
    assert any(s.name.endswith("stream_chat") for s in record.spans)
    assert record.usage is not None
    assert record.usage.total_tokens == USAGE["total_tokens"]
    outcome = record.wait_for_feedback_results(timeout=WAIT)[blue]
    assert (outcome.status, outcome.result) == (FeedbackStatus.DONE, 1.0)


def test_a_stream_of_structured_answers_stopped_early_keeps_the_answer_read(
        session: Session) -> None:
    llm = ColourModel()
    with LlamaIndexRecorder(llm, session=session) as recording:
        stream = llm.stream_structured_predict(Colour, PromptTemplate("Colour of {thing}?"),
                                               thing="grass")
        first = next(stream)
        stream.close()
    record = recording.get()
    assert (record.output, record.status) == (first, RecordStatus.CANCELLED)
    assert "stopped" in (record.error or "")


class DropsMidStream(ColourModel):
    """Its stream fails after the first chunk."""

    @llm_chat_callback()
    def stream_chat(self, messages: Any, tools: Any = None, **kwargs: Any) -> Any:
        first = self._chunks(tools)[0]

        def gen() -> Any:
            yield first
            raise ConnectionError("the connection dropped")

        return gen()


def test_a_stream_of_structured_answers_failing_midway_is_an_error(session: Session) -> None:
    llm = DropsMidStream()
    read: list[Any] = []  # (list.extend keeps what it read before the failure)
    with LlamaIndexRecorder(llm, session=session) as recording, \
            pytest.raises(ConnectionError):
        read.extend(llm.stream_structured_predict(
            Colour, PromptTemplate("Colour of {thing}?"), thing="coal"))
    record = recording.get()
    assert (record.output, record.status) == (None, RecordStatus.ERROR)
    assert "the connection dropped" in (record.error or "")
    assert record.metadata["partial_output"] == read[-1]
