"""What both recorders share: app identity, feedback checks, mode and session resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scrutiny import ConfigurationError, Feedback, Session
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


def test_both_recorders_name_an_unknown_mode_clearly() -> None:
    with pytest.raises(ConfigurationError, match="unknown feedback mode 'sometimes'"):
        _recorders(None, feedback_mode="sometimes")


def test_a_closed_explicit_session_is_never_swapped_for_another(tmp_path: Path) -> None:
    given = Session(f"sqlite:///{tmp_path}/given.sqlite")
    recorders = _recorders(given)
    given.close()
    newer = Session(f"sqlite:///{tmp_path}/newer.sqlite")
    try:
        assert all(r.session is given for r in recorders)
    finally:
        newer.close()
