"""A function-calling model recorded alone: one call of the model's API is one record,
whatever helpers of the model's own it goes through."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.llms import ChatMessage, ChatResponse
from llama_index.core.llms.callbacks import llm_chat_callback
from llama_index.core.tools import FunctionTool

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
        return iter(self._chunks(tools))

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
