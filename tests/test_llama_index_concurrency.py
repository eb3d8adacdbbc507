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
from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
)
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import CustomLLM, LLMMetadata, MockLLM
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


# ---------------------------------------------------------------- a model recorded alone
class PausingLLM(CustomLLM):
    """Streams "one", then waits for the next chunk (as on a socket) until `resume` is set;
    `first_sent` is set once the caller asked for that next chunk."""

    _first_sent: threading.Event = PrivateAttr(default_factory=threading.Event)
    _resume: threading.Event = PrivateAttr(default_factory=threading.Event)
    _afirst_sent: asyncio.Event | None = PrivateAttr(default=None)
    _aresume: asyncio.Event | None = PrivateAttr(default=None)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="pausing")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False,
                 **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=f"answer to {prompt}")

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=f"answer to {prompt}")

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponseGen:
        def gen() -> CompletionResponseGen:
            yield CompletionResponse(text="one", delta="one")
            self._first_sent.set()
            assert self._resume.wait(WAIT)
            yield CompletionResponse(text="one two", delta=" two")

        return gen()

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        first_sent, resume = self._async_events()

        async def gen() -> CompletionResponseAsyncGen:
            yield CompletionResponse(text="one", delta="one")
            first_sent.set()
            await asyncio.wait_for(resume.wait(), WAIT)
            yield CompletionResponse(text="one two", delta=" two")

        return gen()

    def _async_events(self) -> tuple[asyncio.Event, asyncio.Event]:
        if self._afirst_sent is None or self._aresume is None:
            self._afirst_sent, self._aresume = asyncio.Event(), asyncio.Event()
        return self._afirst_sent, self._aresume


def _assert_each_call_its_own_record(records: list[Record], call: str) -> None:
    by_input = {r.input: r for r in records}
    assert set(by_input) == {"A", "B"}
    assert (by_input["A"].output, by_input["B"].output) == ("one two", "answer to B")
    assert [s.name for s in by_input["A"].spans] == [f"PausingLLM.{call}"]
    assert by_input["B"].spans[0].name.endswith("complete")


async def test_a_call_from_another_task_while_a_model_stream_waits_is_its_own_record(
        session: Session) -> None:
    """While request A's stream awaited its next chunk, request B's call of the model (in
    another task) was taken for a call of A's stream: B's record was lost in A's."""
    llm = PausingLLM()
    first_sent, resume = llm._async_events()

    async def request_a() -> str:
        stream = await llm.astream_complete("A")
        return "".join([c.delta or "" async for c in stream])

    async def request_b() -> str:
        await asyncio.wait_for(first_sent.wait(), WAIT)  # A's stream is waiting now
        try:
            return (await llm.acomplete("B")).text
        finally:
            resume.set()

    async with LlamaIndexRecorder(llm, session=session) as recording:
        assert await asyncio.gather(request_a(), request_b()) == ["one two", "answer to B"]
    _assert_each_call_its_own_record(recording.records, "astream_complete")


def test_a_call_from_another_thread_while_a_model_stream_waits_is_its_own_record(
        session: Session) -> None:
    llm = PausingLLM()
    read: list[str] = []

    def request_a() -> None:
        read.append("".join(c.delta or "" for c in llm.stream_complete("A")))

    with LlamaIndexRecorder(llm, session=session) as recording:
        worker = threading.Thread(target=contextvars.copy_context().run, args=(request_a,))
        worker.start()
        try:
            assert llm._first_sent.wait(WAIT)  # A's stream is waiting in its thread now
            contextvars.copy_context().run(llm.complete, "B")
        finally:
            llm._resume.set()
            worker.join(WAIT)
    assert read == ["one two"]
    _assert_each_call_its_own_record(recording.records, "stream_complete")
