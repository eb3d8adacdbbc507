"""Code written for TruLens runs with only its imports changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scrutiny import FeedbackStatus
from scrutiny.compat.trulens import (
    Feedback,
    NoEquivalent,
    Select,
    TruChain,
    TruLlama,
    TruSession,
)
from tests.support.loop_ticks import LoopTicks


def test_a_trulens_langchain_quickstart_runs(tmp_path: Path,
                                             make_retrieval_chain: Any) -> None:
    session = TruSession(f"sqlite:///{tmp_path}/tru.sqlite")
    rag_chain = make_retrieval_chain(["Paris is the capital of France."])

    def relevance(question: str, answer: str) -> float:
        return 1.0 if "capital" in question and "capital" in answer else 0.0

    def context_relevance(question: str, context: str) -> float:
        return 1.0 if "France" in context else 0.0

    context = TruChain.select_context(rag_chain)
    f_answer = Feedback(relevance, name="Answer Relevance").on_input_output()
    f_context = (Feedback(context_relevance, name="Context Relevance")
                 .on_input().on(context).aggregate(np.mean))
    f_len = Feedback(lambda output: len(output) / 100, name="Length").on(Select.RecordOutput)
    tru_recorder = TruChain(rag_chain, app_name="ChatApplication", app_version="Chain1",
                            feedbacks=[f_answer, f_context, f_len], session=session)
    with tru_recorder as recording:
        llm_response = rag_chain.invoke("What is the capital of France?")
    assert llm_response == "Paris is the capital of France."
    rec = recording.get()
    results = rec.wait_for_feedback_results()
    assert {f.name: r.result for f, r in results.items()} == {
        "Answer Relevance": 1.0, "Context Relevance": 0.5, "Length": 0.31}
    assert all(r.status is FeedbackStatus.DONE for r in results.values())
    # (TruLens's idiom; it raised a bare AttributeError)
    assert {f.name: r.result for f, r in rec.feedback_results_as_completed} == {
        f.name: r.result for f, r in results.items()}
    board = session.get_leaderboard(app_ids=[])
    assert board.loc[("ChatApplication", "Chain1"), "Answer Relevance"] == 1.0
    _, feedback_names = session.get_records_and_feedback()
    assert sorted(feedback_names) == ["Answer Relevance", "Context Relevance", "Length"]
    assert session.wait_for_feedback_results(timeout=10)
    assert session.reset_database() == 1
    assert session.get_records_and_feedback()[0].empty
    session.close()


def test_trulens_session_is_one_per_process(tmp_path: Path, make_retrieval_chain: Any) -> None:
    """TruLens's `TruSession()` later in a script (to read the leaderboard) is the same
    session; here it made a second one on the default database, and every recorder made
    without session= stored its records there from then on, without a word."""
    url = f"sqlite:///{tmp_path}/team.sqlite"
    session = TruSession(url)
    try:
        chain = make_retrieval_chain(["Paris."] * 2)
        recorder = TruChain(chain, app_name="qa")  # (no session=: the session made last)
        with recorder:
            chain.invoke("first?")
        again = TruSession()
        assert again is session
        assert TruSession(url) is session
        with recorder:
            chain.invoke("second?")
        assert len(session.get_records_and_feedback()[0]) == 2
    finally:
        session.close()
    other = TruSession(f"sqlite:///{tmp_path}/other.sqlite")  # (closed: a new one is made)
    assert other is not session
    other.close()


def test_a_trulens_llama_index_quickstart_runs(tmp_path: Path) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import MockLLM

    session = TruSession(f"sqlite:///{tmp_path}/tru.sqlite")
    index = VectorStoreIndex.from_documents(
        [Document(text="The author grew up painting."), Document(text="Rome is old.")],
        embed_model=MockEmbedding(embed_dim=8))
    engine = index.as_query_engine(llm=MockLLM(max_tokens=8))
    f_ctx = Feedback(lambda context: 1.0, name="ctx").on(TruLlama.select_source_nodes())
    tru = TruLlama(engine, app_id="docs-qa", feedbacks=[f_ctx], session=session)
    with tru as recording:
        engine.query("What did the author do growing up?")
    result = next(iter(recording.get().wait_for_feedback_results(timeout=30).values()))
    assert result.status is FeedbackStatus.DONE
    assert session.get_records_and_feedback()[0].loc[0, "app_name"] == "docs-qa"
    session.close()


def test_a_recorders_app_id_is_what_its_records_are_filtered_by(tmp_path: Path) -> None:
    """TruLens code filters with `app_ids=[tru.app_id]`: the attribute was missing."""
    from langchain_core.runnables import RunnableLambda

    from scrutiny.compat.trulens import TruChain, TruSession

    session = TruSession(f"sqlite:///{tmp_path}/t.sqlite")
    chain = RunnableLambda(lambda q: f"answer to {q}")
    try:
        tru = TruChain(chain, app_name="qa", app_version="v2", session=session)
        with tru:
            chain.invoke("q")
        assert tru.app_id == "qa:v2"
        df, _ = session.get_records_and_feedback(app_ids=[tru.app_id])
        assert list(df["app_id"]) == ["qa:v2"]
        assert len(session.get_leaderboard(app_ids=[tru.app_id])) == 1
    finally:
        session.close()


async def test_with_record_returns_the_result_and_its_record(tmp_path: Path) -> None:
    """TruLens code writes `response, record = tru.with_record(chain.invoke, q)`: the
    method was missing."""
    from langchain_core.runnables import RunnableLambda


    session = TruSession(f"sqlite:///{tmp_path}/w.sqlite")
    chain = RunnableLambda(lambda q: f"answer to {q}")
    f_len = Feedback(lambda output: len(output) / 100, name="Length").on_output()
    try:
        tru = TruChain(chain, app_name="qa", feedbacks=[f_len], session=session)
        response, record = tru.with_record(chain.invoke, "q1")
        assert response == "answer to q1"
        assert (record.input, record.output) == ("q1", "answer to q1")
        assert record.wait_for_feedback_results(timeout=10)[f_len].result == 0.12
        response, record = await tru.awith_record(chain.ainvoke, "q2")
        assert (response, record.input) == ("answer to q2", "q2")
        with pytest.raises(NoEquivalent, match="record_metadata"):
            tru.with_record(chain.invoke, "q3", record_metadata={"user": "u1"})
        assert session.wait_for_feedback(10)
        assert len(session.get_records_and_feedback()[0]) == 2
    finally:
        session.close()


# ---------------------------------------------------------------------- TruLens code as written
def _relevance(prompt: str, response: str) -> float:
    return 1.0 if "capital" in response else 0.0


def _context_relevance(question: str, context: str) -> float:
    return 0.5


def test_trulens_feedback_arguments_and_wiring(tmp_path: Path,
                                               make_retrieval_chain: Any) -> None:
    """`Feedback(fn, agg=...)`, `imp=`, `.on_default()`, `.on_prompt()`, `.on_response()`,
    `.on_input(arg)` and `.on_context(collect_list=)` were a TypeError or AttributeError."""
    session = TruSession(f"sqlite:///{tmp_path}/f.sqlite")
    chain = make_retrieval_chain(["Paris is the capital of France."])

    def grounded(source: list[str], statement: str) -> tuple[float, dict[str, str]]:
        return (1.0 if len(source) == 2 else 0.0), {"reason": "two contexts"}

    feedbacks = [
        Feedback(_context_relevance, agg=max, name="ctx max").on_input().on(
            TruChain.select_context(chain)),
        Feedback(imp=_relevance, name="default").on_default(),
        Feedback(_relevance, name="prompt/response").on_prompt().on_response(),
        Feedback(_relevance, name="by name").on_output("response").on_input("prompt"),
        Feedback(grounded, name="grounded").on_context(collect_list=True).on_output(),
        Feedback(_context_relevance, name="each").on_input().on_context(collect_list=False),
    ]
    assert feedbacks[0].agg is max
    assert feedbacks[1].imp is _relevance
    assert feedbacks[3].selectors == {"response": "Select.output", "prompt": "Select.input"}
    try:
        tru = TruChain(chain, app_name="qa", feedbacks=feedbacks, session=session)
        with tru as recording:
            chain.invoke("What is the capital of France?")
        results = recording.get().wait_for_feedback_results(feedback_timeout=10)
        by_name = {f.name: r for f, r in results.items()}
        assert {n: r.result for n, r in by_name.items()} == {
            "ctx max": 0.5, "default": 1.0, "prompt/response": 1.0, "by name": 1.0,
            "grounded": 1.0, "each": 0.5}
        assert by_name["grounded"].explanation == "two contexts"
    finally:
        session.close()


def test_trulens_only_feedback_options_say_what_to_do_instead() -> None:
    from scrutiny import ConfigurationError

    with pytest.raises(NoEquivalent, match=r"criteria=.*LLMJudge"):
        Feedback(_relevance, criteria="Is it polite?")
    with pytest.raises(ConfigurationError, match="name="):
        Feedback(_relevance, "Relevance")  # (TruLens's second argument is the aggregate)
    Feedback(_relevance, min_score_val=0, max_score_val=3)  # (their defaults: nothing asked)
    with pytest.raises(ConfigurationError, match="on_default"):
        Feedback(lambda a, b, c: 1.0).on_default()


@pytest.mark.parametrize("lens", ["RecordCalls", "RecordCall", "RecordArgs", "RecordRets",
                                  "Record", "App"])
def test_a_lens_into_call_paths_names_what_to_use_instead(lens: str) -> None:
    """`Select.RecordCalls.retriever...` was a bare AttributeError naming no way forward."""
    from scrutiny import ConfigurationError

    with pytest.raises(ConfigurationError, match=rf"Select\.{lens}: .*Select\.spans\("):
        getattr(Select, lens)
    assert not hasattr(Select, lens)  # (an AttributeError too: introspection is not broken)
    assert Select.RecordInput is Select.input
    assert Select.context() is Select.contexts


def test_trulens_recorder_arguments(tmp_path: Path) -> None:
    """TruLens's `tags` is one string (it was stored letter by letter), its default
    version is "base", and options of its own instrumentation are accepted."""
    from langchain_core.runnables import RunnableLambda

    session = TruSession(f"sqlite:///{tmp_path}/t.sqlite")
    chain = RunnableLambda(lambda q: f"answer to {q}")
    try:
        tru = TruChain(chain, app_name="qa", tags="prototype", session=session,
                       selector_check_warning=False, record_ingest_mode="immediate")
        with tru as recording:
            chain.invoke("q")
        record = recording.get()
        assert record.tags == ["prototype"]
        assert (tru.app_version, record.app_version, tru.app_id) == ("base", "base", "qa:base")
        assert (record.main_input, record.main_output, record.main_error) == (
            "q", "answer to q", None)
        assert record.meta is record.metadata
        with pytest.raises(AttributeError, match=r"record\.usage"):
            record.cost
        with pytest.raises(AttributeError, match=r"recording\.get"):
            tru.wait_for_feedback_results()
        with pytest.raises(AttributeError, match="no attribute 'nothing_like_this'"):
            tru.nothing_like_this
    finally:
        session.close()


def test_trulens_session_arguments_and_reads(tmp_path: Path) -> None:
    """TruSession(database_prefix=), get_records_and_feedback(app_name=, app_version=,
    record_ids=, offset=, limit=) and get_leaderboard(format=) were TypeErrors."""
    from langchain_core.runnables import RunnableLambda

    from scrutiny import ConfigurationError

    with pytest.raises(ConfigurationError, match="redaction"):
        TruSession(f"sqlite:///{tmp_path}/r.sqlite", database_redact_keys=True)
    session = TruSession(database_url=f"sqlite:///{tmp_path}/s.sqlite",
                         database_prefix="tl_")
    assert session.store.prefix == "tl_"
    chain = RunnableLambda(lambda q: f"answer to {q}")
    f_len = Feedback(lambda response: len(response) / 100, name="Length").on_output()
    try:
        ids = {}
        for version in ("v1", "v2"):
            tru = TruChain(chain, app_name="qa", app_version=version, feedbacks=[f_len],
                           session=session)
            for i in range(3):
                _, record = tru.with_record(chain.invoke, f"{version}-{i}")
                ids[f"{version}-{i}"] = record.record_id
        df, names = session.get_records_and_feedback(app_name="qa", app_version="v2")
        assert sorted(df["input"]) == ["v2-0", "v2-1", "v2-2"]
        assert names == ["Length"]
        df, _ = session.get_records_and_feedback(app_name="qa", app_versions=["v1", "v2"],
                                                 offset=1, limit=2)
        assert len(df) == 2
        assert session.get_records_and_feedback(app_name="other")[0].empty
        assert session.get_records_and_feedback(app_ids=["qa:v1"], app_version="v2")[0].empty
        wanted = [ids["v1-0"], ids["v2-2"]]
        assert session.wait_for_feedback_results(wanted, ["Length"], timeout=10)
        df, names = session.get_records_and_feedback(record_ids=wanted)
        assert list(df["input"]) == ["v2-2", "v1-0"]  # newest first
        assert list(df["Length"]) == [0.14, 0.14]
        rows = session.get_leaderboard(format="dict")
        assert [(r["app_name"], r["app_version"], r["records"]) for r in rows] == [
            ("qa", "v1", 3), ("qa", "v2", 3)]
        assert len(json.loads(session.get_leaderboard(format="json"))) == 2
        with pytest.raises(ConfigurationError, match="get_records_and_feedback"):
            session.get_leaderboard(group_by_metadata_key="user")
        with pytest.raises(ConfigurationError, match="runs"):
            session.get_records_and_feedback(run_name="r1")
        with pytest.raises(ConfigurationError, match="record_ids is a list"):
            session.wait_for_feedback_results(10)
        with pytest.raises(ConfigurationError, match="no result of feedback 'Nope'"):
            session.wait_for_feedback_results(wanted, ["Nope"], timeout=10)
        with pytest.raises(AttributeError, match=r"session\.ingest"):
            session.add_record
        assert session.delete_app("qa:v1") == 3
        assert session.get_app("qa:v1") is None
        assert session.get_app("qa:v2")["records"] == 3
    finally:
        session.close()


def test_deferred_evaluation_with_trulens_names(tmp_path: Path) -> None:
    """`start_evaluator()` / `stop_evaluator()` were missing, and waiting by record ids
    (TruLens 2) was a TypeError."""
    from langchain_core.runnables import RunnableLambda

    from scrutiny import FeedbackMode, FeedbackTimeout
    from tests.support import deferred_feedbacks as fbs

    session = TruSession(f"sqlite:///{tmp_path}/d.sqlite", feedback_mode=FeedbackMode.DEFERRED)
    chain = RunnableLambda(lambda q: f"answer to {q}")
    try:
        tru = TruChain(chain, app_name="qa", session=session,
                       feedbacks=[Feedback(fbs.length, name="Length").on_output()])
        _, record = tru.with_record(chain.invoke, "q")
        with pytest.raises(FeedbackTimeout, match=r"'Length' of record .* \(pending\)"):
            session.wait_for_feedback_results([record.record_id], ["Length"], timeout=0.2)
        worker = session.start_evaluator()
        with pytest.raises(RuntimeError, match="already running"):
            session.start_evaluator()
        assert session.wait_for_feedback_results([record.record_id], timeout=30)
        assert session.get_records_and_feedback()[0].loc[0, "Length"] == 0.11
        session.stop_evaluator()
        assert not worker.running
        with pytest.raises(RuntimeError, match="not running"):
            session.stop_evaluator()
    finally:
        session.close()


def test_tru_basic_app_records_a_plain_function(tmp_path: Path) -> None:
    """TruBasicApp was missing: TruLens code recording a plain function failed to import."""
    from scrutiny import RecordStatus
    from scrutiny.compat.trulens import TruBasicApp

    session = TruSession(f"sqlite:///{tmp_path}/b.sqlite")

    def answer(prompt: str) -> str:
        if prompt == "fail":
            raise ValueError("no answer")
        return f"answer to {prompt}"

    f_rel = Feedback(_relevance, name="Relevance").on_input_output()
    try:
        tru = TruBasicApp(answer, app_name="basic", app_version="1", feedbacks=[f_rel],
                          session=session)
        assert tru.app("outside") == "answer to outside"  # (not recorded, as in TruLens)
        with tru as recording:
            assert tru.app("the capital?") == "answer to the capital?"
        record = recording.records[0]
        assert (record.main_input, record.main_output) == ("the capital?",
                                                           "answer to the capital?")
        assert record.wait_for_feedback_results(feedback_timeout=10)[f_rel].result == 1.0
        with tru as recording, pytest.raises(ValueError, match="no answer"):
            tru.app("fail")
        assert recording.get().status is RecordStatus.ERROR
        assert recording.get().error == "ValueError: no answer"
        response, record = tru.with_record(tru.app, "capital of France")
        assert response == "answer to capital of France"
        assert session.wait_for_feedback_results(timeout=10)
        df, _ = session.get_records_and_feedback(app_ids=[tru.app_id])
        assert sorted(df["input"]) == ["capital of France", "fail", "the capital?"]
        assert sorted(df["Relevance status"]) == ["done", "done", "skipped"]
    finally:
        session.close()


async def test_tru_basic_app_records_an_async_functions_answer(tmp_path: Path) -> None:
    """Over an `async def`, the record held the coroutine object as its output, with no
    time taken, and every output feedback failed; the caller got the real answer."""
    import asyncio

    from scrutiny import RecordStatus
    from scrutiny.compat.trulens import TruBasicApp

    session = TruSession(f"sqlite:///{tmp_path}/async.sqlite")

    async def bot(prompt: str) -> str:
        await asyncio.sleep(0.05)
        if prompt == "fail":
            raise ValueError("no answer")
        return "Hi " + prompt

    f_len = Feedback(lambda text: float(len(text)), name="len").on_output()
    try:
        tru = TruBasicApp(bot, app_name="async bot", feedbacks=[f_len], session=session)
        answer, record = await tru.awith_record(tru.app, "there")
        assert (answer, record.main_output) == ("Hi there", "Hi there")
        assert record.latency >= 0.05
        results = await record.await_feedback_results(timeout=10)
        assert (results[f_len].status, results[f_len].result) == (FeedbackStatus.DONE, 8.0)
        async with tru as recording:
            with pytest.raises(ValueError, match="no answer"):
                await tru.app("fail")
        assert (recording.get().status, recording.get().error) == (
            RecordStatus.ERROR, "ValueError: no answer")
    finally:
        session.close()


async def _slow_relevance(prompt: str, response: str) -> float:
    import asyncio

    await asyncio.sleep(0.3)  # (the feedback's own work)
    return 1.0


async def test_leaving_async_with_a_basic_app_in_with_app_mode_keeps_the_loop_running(
        tmp_path: Path) -> None:
    """`async with tru:` waited for the results (with_app mode) by blocking the event loop."""

    from scrutiny.compat.trulens import TruBasicApp

    session = TruSession(f"sqlite:///{tmp_path}/a.sqlite")
    f_slow = Feedback(_slow_relevance, name="slow").on_input_output()
    try:
        tru = TruBasicApp(lambda prompt: f"answer to {prompt}", app_name="basic",
                          feedbacks=[f_slow], feedback_mode="with_app", session=session)
        async with LoopTicks() as ticks, tru as recording:
            tru.app("the capital?")
        assert recording.get().feedback_results[f_slow].status is FeedbackStatus.DONE
        assert ticks.count >= 5, ticks.count  # the loop went on while the block waited
    finally:
        session.close()


@pytest.mark.parametrize("name", ["TruApp", "TruCustomApp", "TruVirtual", "instrument"])
def test_apps_without_an_equivalent_name_the_way_forward(name: str) -> None:
    from scrutiny import ConfigurationError
    from scrutiny.compat import trulens

    refused = getattr(trulens, name)
    with pytest.raises(ConfigurationError, match=r"TruBasicApp\(fn.*TruChain"):
        refused(object(), app_name="x")
    with pytest.raises(ConfigurationError, match="no equivalent"):
        refused.method(object, "query")


def test_the_dashboard_with_trulens_names(tmp_path: Path) -> None:
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from scrutiny.compat.trulens import Tru, run_dashboard, stop_dashboard

    session = Tru(f"sqlite:///{tmp_path}/u.sqlite")
    try:
        handle = run_dashboard(session)
        assert handle.url.startswith("http://127.0.0.1:")
        assert session.run_dashboard() is handle  # (already running: the same one)
        stop_dashboard(session)
        assert not handle.running
        with pytest.raises(RuntimeError, match="not running"):
            stop_dashboard(session)
    finally:
        session.close()


def test_trulens_llama_index_context_lenses(tmp_path: Path) -> None:
    """`TruLlama.select_source_nodes().node.text` — TruLens's LlamaIndex quickstart — was
    an AttributeError; other fields of a node say that only its text is kept."""
    pytest.importorskip("llama_index.core")
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import MockLLM

    from scrutiny import ConfigurationError

    session = TruSession(f"sqlite:///{tmp_path}/l.sqlite")
    texts = ["The author grew up painting.", "Rome is old."]
    index = VectorStoreIndex.from_documents([Document(text=t) for t in texts],
                                            embed_model=MockEmbedding(embed_dim=8))
    engine = index.as_query_engine(llm=MockLLM(max_tokens=8), similarity_top_k=2)

    def seen(contexts: list[str]) -> float:
        return float(sorted(contexts) == sorted(texts))

    def each(context: str) -> float:
        return float(context in texts)

    fbs = [Feedback(seen, name="node.text").on(
               TruLlama.select_source_nodes().node.text.collect()),
           Feedback(each, name="select_context").on(TruLlama.select_context(engine))]
    with pytest.raises(ConfigurationError, match=r"\.node\.text"):
        TruLlama.select_source_nodes().node.metadata
    with pytest.raises(ConfigurationError, match=r"select_source_nodes\(\)\.score"):
        TruLlama.select_source_nodes().score
    try:
        tru = TruLlama(engine, app_name="docs-qa", feedbacks=fbs, session=session)
        with tru as recording:
            engine.query("What did the author do growing up?")
        results = recording.get().wait_for_feedback_results(feedback_timeout=30)
        assert {f.name: r.result for f, r in results.items()} == {
            "node.text": 1.0, "select_context": 1.0}
        assert recording.get().main_input == "What did the author do growing up?"
    finally:
        session.close()


def test_the_trulens_langchain_provider_judges_under_trulens_names(
        tmp_path: Path, make_retrieval_chain: Any) -> None:
    """`provider.relevance_with_cot_reasons` & co. did not exist: TruLens's provider code
    had no counterpart to change its import to."""
    from langchain_core.language_models import FakeListChatModel

    from scrutiny import ConfigurationError
    from scrutiny.compat.trulens import Langchain, OpenAI

    session = TruSession(f"sqlite:///{tmp_path}/p.sqlite")
    chain = make_retrieval_chain(["Paris is the capital of France."])
    provider = Langchain(chain=FakeListChatModel(
        responses=['{"score": 8, "reasons": "on topic"}'] * 20))
    grounded = Langchain(chain=FakeListChatModel(
        responses=['{"statements": [{"statement": 1, "score": 10, "reason": "stated"}]}']))
    context = TruChain.select_context(chain)
    feedbacks = [
        Feedback(provider.relevance_with_cot_reasons, name="Answer Relevance")
        .on_input_output(),
        Feedback(provider.context_relevance_with_cot_reasons, name="Context Relevance")
        .on_input().on(context).aggregate(np.mean),
        Feedback(provider.relevance).on_input_output(),
        Feedback(provider.harmfulness).on_output(),
        Feedback(grounded.groundedness_measure_with_cot_reasons, name="Groundedness")
        .on(context.collect()).on_output(),
        # (TruLens's one-text correctness: LLMJudge's two-parameter one was wired to the
        # question as the answer and the app's answer as the reference)
        Feedback(provider.correctness).on_output(),
        # (an alias was named context_relevance: df["qs_relevance"] failed)
        Feedback(provider.qs_relevance).on_input().on(context).aggregate(np.mean),
    ]
    assert [f.name for f in feedbacks[2:4]] == ["relevance", "harmfulness"]
    assert feedbacks[3].higher_is_better is False
    assert feedbacks[5].selectors == {"text": "Select.output"}
    assert feedbacks[6].name == "qs_relevance"
    try:
        tru = TruChain(chain, app_name="rag", feedbacks=feedbacks, session=session)
        with tru as recording:
            chain.invoke("What is the capital of France?")
        results = {f.name: r for f, r in
                   recording.get().wait_for_feedback_results(feedback_timeout=30).items()}
        assert {n: r.result for n, r in results.items()} == {
            "Answer Relevance": 0.8, "Context Relevance": 0.8, "relevance": 0.8,
            "harmfulness": 0.8, "Groundedness": 1.0, "correctness": 0.8, "qs_relevance": 0.8}
        assert results["Answer Relevance"].explanation == "on topic"
        assert "stated" in (results["Groundedness"].explanation or "")
    finally:
        session.close()
    with pytest.raises(ConfigurationError, match=r"Langchain\(chain=ChatOpenAI"):
        OpenAI(model_engine="gpt-4o")


@pytest.mark.parametrize("name", ["VirtualApp", "VirtualRecord"])
def test_virtual_records_name_the_way_forward(name: str) -> None:
    """TruLens's offline users import TruVirtual, VirtualApp and VirtualRecord together:
    the last two were a bare ImportError."""
    from scrutiny import ConfigurationError
    from scrutiny.compat import trulens

    with pytest.raises(ConfigurationError, match=r"scrutiny.Record of each row"):
        getattr(trulens, name)(main_input="q", main_output="a")


def test_trulens_2_names_and_idioms_run_or_say_what_to_use(tmp_path: Path) -> None:
    """`class StandAlone(Provider)`, `Feedback.on({...})` and TruLens's other names gave
    bare ImportErrors and AttributeErrors (or a refusal that did not say to name them)."""
    from langchain_core.language_models import FakeListChatModel

    from scrutiny import Record
    from scrutiny.compat.trulens import (
        Groundedness,
        GroundTruthAgreement,
        Langchain,
        Metric,
        Provider,
    )
    from scrutiny.compat.trulens import Selector as TruSelector

    class StandAlone(Provider):
        def short(self, response: str) -> float:
            return float(len(response) < 100)

    session = TruSession(f"sqlite:///{tmp_path}/p2.sqlite")
    try:
        by_dict = Feedback(StandAlone().short).on({"response": Select.RecordOutput})
        assert by_dict.selectors == {"response": "Select.output"}
        record = session.ingest(Record(app_name="a", app_version="v1", input="q",
                                       output="short answer"), [by_dict])
        assert record.wait_for_feedback_results(timeout=10)["short"].result == 1.0
    finally:
        session.close()
    provider = Langchain(chain=FakeListChatModel(responses=["8"]))
    for use, hint in ((lambda: provider.helpfulness_with_cot_reasons, "provider.rubric"),
                      (lambda: Groundedness(groundedness_provider=provider),
                       "groundedness_measure_with_cot_reasons"),
                      (lambda: GroundTruthAgreement({}), "GroundTruth"),
                      (lambda: Metric(), "Feedback\\(fn\\)"),
                      (lambda: TruSelector(), "Select.input")):
        with pytest.raises(NoEquivalent, match=hint):
            use()
    with pytest.raises(AttributeError):
        provider.no_such_method


def test_a_recorders_trulens_only_methods_say_what_to_use(
        tmp_path: Path, make_retrieval_chain: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`tru.print_instrumented()` is informational: it ended a quickstart with an error.
    It prints what Scrutiny does instead; a call that would do something raises."""
    session = TruSession(f"sqlite:///{tmp_path}/m.sqlite")
    try:
        tru = TruChain(make_retrieval_chain(["Paris."]), app_name="qa", session=session)
        tru.print_instrumented()
        assert "Scrutiny instruments nothing" in capsys.readouterr().out
        with pytest.raises(NoEquivalent, match=r"tru.main_call .*tru.with_record"):
            tru.main_call("q")
    finally:
        session.close()
