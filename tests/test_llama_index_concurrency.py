"""Concurrent calls through one recorder never mix their records."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.llms.types import CompletionResponse
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from llama_index.core.llms.callbacks import llm_completion_callback
from pydantic import PrivateAttr

from scrutiny import Record, Session
from scrutiny.integrations.llama_index import LlamaIndexRecorder
from tests.support.llama_index_fixtures import _no_leaked_traces  # noqa: F401

TEXTS = ("The sky is blue.", "Grass is green.", "Snow is white.", "Coal is black.")
WAIT = 10.0


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    return VectorStoreIndex.from_documents([Document(text=t) for t in TEXTS],
                                           embed_model=MockEmbedding(embed_dim=8))


class GatedLLM(MockLLM):
    """Echoes the question of its prompt; no call answers before `parties` calls arrived,
    so the calls are forced to interleave (threads or asyncio tasks)."""

    _parties: int = PrivateAttr()
    _barrier: threading.Barrier = PrivateAttr()
    _arrived: int = PrivateAttr(default=0)
    _all_in: asyncio.Event | None = PrivateAttr(default=None)

    def __init__(self, parties: int) -> None:
        super().__init__()
        self._parties = parties
        self._barrier = threading.Barrier(parties, timeout=WAIT)

    @staticmethod
    def _answer(prompt: str) -> str:
        question = prompt.split("Query: ")[-1].split("\n")[0]
        return f"answer to {question}"

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self._barrier.wait()
        return CompletionResponse(text=self._answer(prompt))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponse:
        if self._all_in is None:
            self._all_in = asyncio.Event()
        self._arrived += 1
        if self._arrived == self._parties:
            self._all_in.set()
        await asyncio.wait_for(self._all_in.wait(), WAIT)
        return CompletionResponse(text=self._answer(prompt))


def _assert_not_mixed(records: list[Record], questions: list[str]) -> None:
    assert sorted(r.input for r in records) == sorted(questions)
    all_ids = [s.span_id for r in records for s in r.spans]
    assert len(all_ids) == len(set(all_ids))  # no span in two records
    for record in records:
        assert record.output == f"answer to {record.input}"
        ids = {s.span_id for s in record.spans}
        root = record.root_span()
        assert root is not None
        assert all(s.parent_id in ids for s in record.spans if s is not root)
        retrieve = next(s for s in record.spans if s.name.endswith("retrieve"))
        assert record.input in str(retrieve.inputs)
        llm = next(s for s in record.spans if s.name.startswith("GatedLLM."))
        assert record.input in str(llm.inputs)
    # all calls overlapped in time: each started before any of them ended
    assert max(r.start_time for r in records) < min(r.end_time for r in records)


async def test_gathered_aqueries_do_not_mix(index: VectorStoreIndex,
                                            session: Session) -> None:
    questions = [f"question-{i}" for i in range(10)]
    engine = index.as_query_engine(llm=GatedLLM(len(questions)), similarity_top_k=2)
    async with LlamaIndexRecorder(engine, session=session) as recording:
        responses = await asyncio.gather(*(engine.aquery(q) for q in questions))
    assert [r.response for r in responses] == [f"answer to {q}" for q in questions]
    assert len(recording.records) == 10
    _assert_not_mixed(recording.records, questions)


def test_threads_do_not_mix(index: VectorStoreIndex, session: Session) -> None:
    questions = [f"thread-question-{i}" for i in range(6)]
    engine = index.as_query_engine(llm=GatedLLM(len(questions)), similarity_top_k=2)
    with LlamaIndexRecorder(engine, session=session) as recording, \
            ThreadPoolExecutor(max_workers=len(questions)) as pool:
        # each thread runs in a copy of the block's context
        futures = [pool.submit(contextvars.copy_context().run, engine.query, q)
                   for q in questions]
        answers = [f.result(timeout=WAIT).response for f in futures]
    assert answers == [f"answer to {q}" for q in questions]
    _assert_not_mixed(recording.records, questions)


def test_thread_without_the_blocks_context_is_not_recorded(index: VectorStoreIndex,
                                                           session: Session) -> None:
    engine = index.as_query_engine(llm=MockLLM(max_tokens=3), similarity_top_k=1)
    with LlamaIndexRecorder(engine, session=session) as recording:
        worker = threading.Thread(target=engine.query, args=("plain thread",))
        worker.start()
        worker.join(WAIT)
        engine.query("own context")
    assert [r.input for r in recording.records] == ["own context"]


async def test_gathered_streaming_aqueries_do_not_mix(index: VectorStoreIndex,
                                                      session: Session) -> None:
    engine = index.as_query_engine(streaming=True, llm=MockLLM(max_tokens=5),
                                   similarity_top_k=2)

    async def ask(question: str) -> str:
        response = await engine.aquery(question)
        parts = []
        async for token in response.async_response_gen():
            parts.append(token)
            await asyncio.sleep(0)  # let the other streams interleave
        return "".join(parts)

    questions = [f"stream-{i}" for i in range(4)]
    async with LlamaIndexRecorder(engine, session=session) as recording:
        texts = await asyncio.gather(*(ask(q) for q in questions))
    by_input = {r.input: r for r in recording.records}
    assert sorted(by_input) == questions
    for question, text in zip(questions, texts, strict=True):
        record = by_input[question]
        assert record.output == text
        ids = {s.span_id for s in record.spans}
        llm_spans = [s for s in record.spans if s.name.startswith("MockLLM.")]
        assert llm_spans
        assert all(s.parent_id in ids for s in llm_spans)
