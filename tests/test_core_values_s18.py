"""Values handed back to the app: the JSON view of a result, token sums, the database URL."""

from __future__ import annotations

import json
from typing import Any

import pytest

from scrutiny import Feedback, Select, Session


# ---------------------------------------------------------------- FeedbackResult.as_dict
def test_a_feedback_event_of_an_app_returning_a_pydantic_model_is_json(
        database_url: str) -> None:
    """as_dict() is "a JSON-friendly view": its calls' arguments were the app's objects,
    and a handler forwarding the event with json.dumps raised TypeError."""
    pytest.importorskip("langchain_core")
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.runnables import RunnableLambda
    from pydantic import BaseModel

    from scrutiny.integrations.langchain import FEEDBACK_EVENT, ChainRecorder

    class Answer(BaseModel):
        text: str
        confidence: float

    sent: list[dict[str, Any]] = []

    class Forward(BaseCallbackHandler):
        def on_custom_event(self, name: str, data: Any, **kw: Any) -> None:
            if name == FEEDBACK_EVENT:
                sent.append(json.loads(json.dumps(data)))

    llm = FakeListChatModel(responses=["hi there"])
    chain = llm | RunnableLambda(lambda m: Answer(text=m.content, confidence=0.9))
    with Session(database_url) as session:
        recorder = ChainRecorder(chain, app_name="x", session=session, feedbacks=[
            Feedback(lambda output: 1.0, name="on_output").on_output(),
            Feedback(lambda m: 1.0, name="on_messages").on(
                Select.spans(kind="chat_model").outputs)])
        with recorder:
            chain.invoke("q", config={"callbacks": [Forward()]})
        assert session.wait_for_feedback(10)
    by_name = {event["feedback_name"]: event for event in sent}
    assert sorted(by_name) == ["on_messages", "on_output"]
    assert by_name["on_output"]["calls"][0]["args"] == {
        "output": {"text": "hi there", "confidence": 0.9}}
    assert by_name["on_output"]["status"] == "done"
