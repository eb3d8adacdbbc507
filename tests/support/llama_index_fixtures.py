"""Fixtures shared by the LlamaIndex tests (import them into a test module to use them)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from scrutiny.integrations.llama_index._handlers import tracer


@pytest.fixture
def thread_loop() -> Iterator[None]:
    """LlamaIndex's sync chat path runs coroutines on `asyncio.get_event_loop()`, which
    creates a loop for the thread that nobody closes: provide one and close it."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


@pytest.fixture(autouse=True)
def _no_leaked_traces() -> Iterator[None]:
    """Every test leaves no open trace behind."""
    yield
    assert tracer.open_traces() == 0
