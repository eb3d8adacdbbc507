"""Providers read a record the same in deferred mode, from its stored form, as in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scrutiny import Feedback, FeedbackStatus, Record, Select, Session
from scrutiny.providers._text import all_text, as_text

TEXT = "Ireland has a mild, wet climate."


def context_read(context: Any) -> tuple[float, str]:
    """What a provider reads of a context (a worker imports it by name)."""
    return 1.0, f"{as_text(context)}\n{all_text(context)}"


def _contexts() -> dict[str, Any]:
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from langchain_core.documents import Document
    from llama_index.core.schema import NodeWithScore, TextNode

    return {
        "document": Document(page_content=TEXT, metadata={"source": "wiki/ireland.txt"},
                             id="doc-7"),
        "node": NodeWithScore(node=TextNode(text=TEXT, metadata={"source": "wiki"}),
                              score=0.8),
    }


@pytest.mark.parametrize("kind", ["document", "node"])
@pytest.mark.parametrize("mode", ["with_app_thread", "deferred"])
def test_a_document_or_node_context_is_read_by_its_text_in_every_mode(
        tmp_path: Path, kind: str, mode: str) -> None:
    """Deferred, a LangChain Document was read as its JSON dump (id, metadata and all) and
    a LlamaIndex NodeWithScore as the word "NodeWithScore": the same record scored
    differently by where it was evaluated."""
    context = _contexts()[kind]
    fb = Feedback(context_read, name="context_read").on(context=Select.contexts)
    with Session(f"sqlite:///{tmp_path}/t.sqlite", feedback_mode=mode) as session:
        record = session.ingest(Record(app_name="qa", app_version="v1", input="Weather?",
                                       output="Mild and wet.", contexts=[context]), [fb])
        if mode == "deferred":
            assert session.flush(10)
            assert session.resume_pending(timeout=30) == 1
        result = record.wait_for_feedback_results(timeout=30)[fb]
    assert result.status is FeedbackStatus.DONE, result.error
    assert result.explanation == f"{TEXT}\n{TEXT}"
