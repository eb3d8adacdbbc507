"""Shapes a web server gives recorded calls (found serving chains with FastAPI/uvicorn).

- Starlette runs each step of a plain generator (a `StreamingResponse` body) and FastAPI
  each step of a `def` dependency with `yield` through `anyio.to_thread.run_sync`, in a
  fresh copy of the context: a block entered in one step was not found when left in
  another, and leaving raised `RecordingError` into the app (a cut-off response body).
- uvicorn's graceful shutdown cancels the requests' tasks, then runs the lifespan shutdown
  (``await session.aclose()``) before those tasks ran their cancellation: the `cancelled`
  records, made a moment later, found the session closed and were lost.
- With no Session made and the default database not answering, each recorded call created
  the default session again (its connect timeout on the server's loop, twice per call),
  and leaving the block raised the failure into the app: HTTP 500s for answers it had.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scrutiny import Session
from scrutiny.core import _recording
from scrutiny.core import _session as session_module

pytest.importorskip("langchain_core")
from langchain_core.language_models import FakeListChatModel

from scrutiny.integrations.langchain import ChainRecorder


@pytest.fixture(autouse=True)
def warn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_recording, "_warned_elsewhere", set(), raising=False)


def _in_fresh_contexts(gen: Iterator[str]) -> list[str]:
    """Read `gen` as Starlette's iterate_in_threadpool does: each step in a fresh copy of
    the caller's context."""
    out = []
    while True:
        try:
            out.append(contextvars.copy_context().run(next, gen))
        except StopIteration:
            return out


def test_a_block_left_in_another_context_is_logged_not_raised_into_the_app(
        session: Session, caplog: pytest.LogCaptureFixture) -> None:
    model = FakeListChatModel(responses=["one two three"])
    recorder = ChainRecorder(model, app_name="sync-stream", session=session)

    def body() -> Iterator[str]:
        with recorder:
            for chunk in model.stream("q"):
                yield str(chunk.content)

    with caplog.at_level(logging.WARNING, logger="scrutiny"):
        assert "".join(_in_fresh_contexts(body())) == "one two three"
    assert "left in another context" in caplog.text
    (record,) = recorder.handler.records
    assert (record.status.value, record.output) == ("ok", "one two three")


def test_a_llama_index_block_left_in_another_context_is_logged_not_raised(
        session: Session, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.llms import MockLLM

    from scrutiny.integrations.llama_index import LlamaIndexRecorder

    llm = MockLLM(max_tokens=4)
    recorder = LlamaIndexRecorder(llm, app_name="li-sync", session=session)

    def body() -> Iterator[str]:
        with recorder:
            yield llm.complete("q").text

    with caplog.at_level(logging.WARNING, logger="scrutiny"):
        assert len(_in_fresh_contexts(body())) == 1
    assert "left in another context" in caplog.text


async def test_aclose_stores_the_calls_a_server_shutdown_just_cancelled(
        database_url: str) -> None:
    session = Session(database_url)
    model = FakeListChatModel(responses=["a long streamed answer"], sleep=0.05)
    recorder = ChainRecorder(model, app_name="shutdown", session=session)
    started = asyncio.Event()

    async def request() -> None:
        async with recorder:
            async for _ in model.astream("q"):
                started.set()

    tasks = [asyncio.create_task(request()) for _ in range(4)]
    await asyncio.wait_for(started.wait(), 10)
    for task in tasks:  # (uvicorn's graceful-shutdown timeout)
        task.cancel()
    assert await session.aclose(10)  # (its lifespan shutdown, before the tasks ran again)
    await asyncio.gather(*tasks, return_exceptions=True)
    with Session(database_url) as reader:
        frame, _ = reader.get_records_and_feedback()
    assert frame["status"].tolist() == ["cancelled"] * 4


@pytest.fixture
def no_session_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "_last_session", None)
    monkeypatch.setattr(session_module, "_default_failure", None, raising=False)


def test_a_default_session_that_cannot_be_made_is_tried_once_and_never_breaks_the_call(
        no_session_yet: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SCRUTINY_DATABASE_URL", f"sqlite:///{tmp_path}/missing/dir/x.sqlite")
    made = []
    real_init = Session.__init__

    def counted(self: Session, *args: Any, **kwargs: Any) -> None:
        made.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Session, "__init__", counted)
    model = FakeListChatModel(responses=["fine"])
    recorder = ChainRecorder(model, app_name="no-db")
    with caplog.at_level(logging.WARNING, logger="scrutiny"):
        for _ in range(3):
            with recorder:
                assert model.invoke("q").content == "fine"
    assert len(made) == 1  # (tried again only after DEFAULT_SESSION_RETRY seconds)
    assert caplog.text.count("the default session could not be created") == 1
    assert [r for r in caplog.records if r.levelno >= logging.WARNING
            and "could not be created" not in r.getMessage()] == []  # (once, not per call)
