"""What both recorders share: app identity, feedback checks, mode and session resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scrutiny import ConfigurationError, Feedback, Select, Session
from tests.support.deferred_feedbacks import length


def _recorders(session: Session | None, **kwargs: Any) -> list[Any]:
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding

    from scrutiny.integrations.langchain import ChainRecorder
    from scrutiny.integrations.llama_index import LlamaIndexRecorder

    index = VectorStoreIndex.from_documents([Document(text="x")],
                                            embed_model=MockEmbedding(embed_dim=8))
    return [ChainRecorder(None, app_name="a", session=session, **kwargs),
            LlamaIndexRecorder(index.as_retriever(), app_name="a", session=session, **kwargs)]


def test_both_recorders_refuse_a_lambda_in_deferred_mode() -> None:
    lam = Feedback(lambda output: 1.0, name="l").on_output()
    for make in range(2):
        with pytest.raises(ConfigurationError, match="lambda cannot be imported"):
            _recorders(None, feedbacks=[lam], feedback_mode="deferred")[make]
    assert len(_recorders(None, feedbacks=[Feedback(length).on_output()],
                          feedback_mode="deferred")) == 2


def test_both_recorders_take_their_feedbacks_from_a_generator(tmp_path: Path) -> None:
    """The checks used a generator up, and the recorder went on with no feedback at all."""
    session = Session(f"sqlite:///{tmp_path}/g.sqlite")
    try:
        for make in range(2):  # (each recorder its own generator)
            chain_recorder, index_recorder = _recorders(session)
            cls = type(chain_recorder if make == 0 else index_recorder)
            app = None if make == 0 else index_recorder.app
            recorder = cls(app, app_name="g", session=session, feedbacks=(
                Feedback(length, name=n).on_output() for n in ("one", "two")))
            assert [fb.name for fb in recorder.feedbacks] == ["one", "two"]
        with pytest.raises(ConfigurationError, match="must be a list of Feedback"):
            _recorders(session, feedbacks=None)
    finally:
        session.close()


def test_both_recorders_name_an_unknown_mode_clearly() -> None:
    with pytest.raises(ConfigurationError, match="unknown feedback mode 'sometimes'"):
        _recorders(None, feedback_mode="sometimes")


def test_both_recorders_refuse_an_app_version_too_long_to_store() -> None:
    """(Every one of its calls was recorded, then lost when stored on PostgreSQL.)"""
    with pytest.raises(ConfigurationError, match=r"at most 800.*metadata="):
        _recorders(None, app_version="You are a helpful assistant. " * 40)


def test_a_closed_explicit_session_is_never_swapped_for_another(tmp_path: Path) -> None:
    given = Session(f"sqlite:///{tmp_path}/given.sqlite")
    recorders = _recorders(given)
    given.close()
    newer = Session(f"sqlite:///{tmp_path}/newer.sqlite")
    try:
        assert all(r.session is given for r in recorders)
    finally:
        newer.close()


def test_the_session_created_last_stays_in_use_once_closed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without session=, a recorder uses the session created last; once it is closed, its
    records are not stored (and it says so) — a default session on another database never
    quietly takes over."""
    from langchain_core.runnables import RunnableLambda

    from scrutiny.integrations.langchain import ChainRecorder

    team = Session(f"sqlite:///{tmp_path}/team.sqlite")
    chain = RunnableLambda(lambda q: f"answer to {q}")
    recorder = ChainRecorder(chain, app_name="qa",
                             feedbacks=[Feedback(length, name="len").on_output()])
    with recorder:
        chain.invoke("before")
    assert team.wait_for_feedback(10)
    team.close()
    with recorder as recording:
        assert chain.invoke("after") == "answer to after"  # the app is not affected
    assert recorder.session is team
    assert recording.get().input == "after"  # recorded in memory, not stored
    assert "is closed; its records are not stored" in caplog.text
    assert "team.sqlite" in caplog.text
    reader = Session(f"sqlite:///{tmp_path}/team.sqlite")
    try:
        df, _ = reader.get_records_and_feedback()
    finally:
        reader.close()
    assert list(df["input"]) == ["before"]
    assert not (tmp_path / "scrutiny.sqlite").exists()


def test_two_feedbacks_with_one_name_are_refused_when_the_recorder_is_made() -> None:
    """Results are stored and shown by name: the second would hide the first's column."""
    twins = [Feedback(lambda output: 0.1).on_output(), Feedback(lambda output: 0.9).on_output()]
    for make in range(2):
        with pytest.raises(ConfigurationError, match="two feedbacks are named 'feedback'"):
            _recorders(None, feedbacks=twins)[make]
    named = [Feedback(length, name="a").on_output(), Feedback(length, name="b").on_output()]
    assert len(_recorders(None, feedbacks=named)) == 2


def test_feedback_names_that_are_table_columns_are_refused() -> None:
    """A feedback named `output` doubled the records table's output column; one named
    `records` or `failed` replaced the leaderboard's counts; `q status` collided with the
    status column of a feedback `q`; `q reason` hid q's reason column (reasons=True) and
    broke `scrutiny records --reasons --format csv`."""
    for name in ("output", "records", "failed", "q status", "q reason"):
        with pytest.raises(ConfigurationError, match=f"cannot be named '{name}'"):
            _recorders(None, feedbacks=[Feedback(length, name=name).on_output()])


def test_a_recorder_without_session_is_checked_against_the_sessions_deferred_mode(
        tmp_path: Path) -> None:
    """The README's shape: the session is deferred, the recorder names no session; a lambda
    must be refused when the recorder is made, not found failing later in the database."""
    with Session(f"sqlite:///{tmp_path}/d.sqlite", feedback_mode="deferred"):
        lam = Feedback(lambda output: 1.0, name="l").on_output()
        for make in range(2):
            with pytest.raises(ConfigurationError, match="lambda cannot be imported"):
                _recorders(None, feedbacks=[lam])[make]


def test_a_recorder_whose_session_is_closed_gives_its_feedbacks_failed_not_none(
        tmp_path: Path) -> None:
    """A recorder tied to a closed session (one a fixture closed, a notebook's earlier
    one) returned records with no results at all: a test asserting every score passed
    with nothing evaluated."""
    from langchain_core.runnables import RunnableLambda
    from llama_index.core.llms import MockLLM

    from scrutiny.integrations.langchain import ChainRecorder
    from scrutiny.integrations.llama_index import LlamaIndexRecorder

    session = Session(f"sqlite:///{tmp_path}/closed.sqlite")
    feedbacks = [Feedback(length, name="len").on_output()]
    chain = RunnableLambda(lambda q: f"answer to {q}")
    llm = MockLLM(max_tokens=4)
    chain_recorder = ChainRecorder(chain, app_name="qa", session=session, feedbacks=feedbacks)
    llm_recorder = LlamaIndexRecorder(llm, app_name="qa", session=session, feedbacks=feedbacks)
    session.close()
    with chain_recorder as chain_recording:
        chain.invoke("q")
    with llm_recorder as llm_recording:
        llm.complete("q")
    for recording in (chain_recording, llm_recording):
        results = recording.get().wait_for_feedback_results(timeout=10)
        assert [(f.name, r.status.value) for f, r in results.items()] == [("len", "failed")]
        assert "not evaluated" in (next(iter(results.values())).error or "")


def test_a_recorder_without_a_session_to_be_had_gives_its_feedbacks_failed(
        tmp_path: Path) -> None:
    """No Session made, and the default one cannot be opened (SCRUTINY_DATABASE_URL in a
    folder that does not exist, on a CI machine): the record had no results at all."""
    import os
    import subprocess
    import sys

    script = (
        "from langchain_core.runnables import RunnableLambda\n"
        "from scrutiny import Feedback\n"
        "from scrutiny.integrations.langchain import ChainRecorder\n"
        "chain = RunnableLambda(lambda q: 'an answer')\n"
        "recorder = ChainRecorder(chain, app_name='qa', feedbacks=[Feedback(\n"
        "    lambda output: 1.0, name='len').on_output()])\n"
        "with recorder as recording:\n"
        "    chain.invoke('q')\n"
        "[(fb, result)] = recording.get().wait_for_feedback_results(timeout=10).items()\n"
        "print(fb.name, result.status.value, result.error)\n")
    env = {**os.environ, "SCRUTINY_DATABASE_URL": f"sqlite:///{tmp_path}/missing/db.sqlite"}
    ran = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("len failed not evaluated: there is no session to store "
                                 "the record in"), ran.stdout


def test_misused_arguments_say_what_to_give() -> None:
    """A URL as session=, the app where the app name goes, a string of tags (kept as its
    characters), a list as metadata, a dict to session.ingest, an evaluator's class as a
    feedback, a chat model to rag_triad: each failed deep inside (AttributeError), or not
    at all, instead of saying what to give."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from scrutiny.integrations.langchain import ChainRecorder, ScrutinyCallbackHandler
    from scrutiny.providers import PIIDetector, rag_triad

    llm = FakeListChatModel(responses=["a"])
    cases: list[tuple[Any, str]] = [
        (lambda: ChainRecorder(llm, app_name="qa", session="sqlite:///x.sqlite"),
         r"session= takes a Session, not a str \(a database URL\? pass session=Session"),
        (lambda: ScrutinyCallbackHandler(llm, "v1"),
         r"app_name is text.*got FakeListChatModel: the app itself goes to ChainRecorder"),
        (lambda: ChainRecorder(llm, app_name="qa", tags="prod"),
         r"tags is a list of strings, e.g. tags=\['prod'\]"),
        (lambda: ChainRecorder(llm, app_name="qa", metadata=["env", "prod"]),
         r"metadata is a dict"),
        (lambda: Session("memory://").ingest({"input": "q", "output": "a"}),  # type: ignore[type-var]
         r"session.ingest takes a Record.*Record\(\*\*row\)"),
        (lambda: Feedback(PIIDetector).on_output(),
         r"pass an instance, Feedback\(PIIDetector\(\)\)"),
        (lambda: rag_triad(llm), r"rag_triad\(LLMJudge\(model\)\)"),
        (lambda: ChainRecorder(), r"needs the app it records, or an app_name"),
        (lambda: Select.input.outputs, r"\.outputs is for span selections"),
    ]
    for make, says in cases:
        with pytest.raises(ConfigurationError, match=says):
            make()
