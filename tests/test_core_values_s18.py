"""Values handed back to the app: the JSON view of a result, token sums, the database URL."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from scrutiny import Feedback, Record, Select, Session, TokenUsage


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


# ---------------------------------------------------------------- token sums
def test_a_total_missing_from_one_usage_is_its_prompt_plus_completion() -> None:
    total = TokenUsage.total([TokenUsage(10, 5, 15), TokenUsage(20, 2, None)])
    assert total == TokenUsage(30, 7, 37)  # (it said 15: the totals present alone)


def test_a_total_that_cannot_be_known_is_none_not_a_part_of_it() -> None:
    assert TokenUsage.total([TokenUsage(10, 5, 15), TokenUsage(20, None, None)]) == \
        TokenUsage(30, 5, None)
    # (a usage that reported nothing adds nothing)
    assert TokenUsage.total([TokenUsage(10, 5, 15), TokenUsage(), None]) == \
        TokenUsage(10, 5, 15)


def test_a_usage_dict_without_a_total_is_stored_with_prompt_plus_completion(
        database_url: str) -> None:
    """Anthropic-style counts: total None, so the leaderboard's tokens showed nothing,
    unlike the same usage recorded from a model (the recorders add them up)."""
    with Session(database_url) as session:
        record = session.ingest(Record(app_name="qa", app_version="v1", input="q",
                                       output="a",
                                       usage={"input_tokens": 50, "output_tokens": 5}))
        assert record.usage == TokenUsage(50, 5, 55)
        assert session.flush(10)
        board = session.get_leaderboard()
    assert board["total_tokens"].tolist() == [55]


# ---------------------------------------------------------------- database_url
@pytest.mark.postgres
def test_database_url_hides_the_password(tmp_path: Any) -> None:
    """It returned the URL with its password in clear (str(engine.url) masks it)."""
    from sqlalchemy.engine import make_url

    from tests.support.postgres import postgres_url

    # (the test server trusts every connection: any password opens it)
    url = make_url(postgres_url()).set(password="Hunter2-secret").render_as_string(
        hide_password=False)
    with Session(url, table_prefix=f"t{uuid.uuid4().hex[:10]}_") as session:
        shown = session.database_url
        assert "Hunter2-secret" not in shown
        assert shown == make_url(url).render_as_string(hide_password=True)
    # (one without a password is as given)
    plain = f"sqlite:///{tmp_path}/a b.sqlite"
    with Session(plain) as session:
        assert session.database_url == plain
