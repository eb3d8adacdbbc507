"""Counting how often an event loop got to run other work while something was awaited."""

from __future__ import annotations

import asyncio
from types import TracebackType


class LoopTicks:
    """``async with LoopTicks() as ticks:`` counts, in ``ticks.count``, the 10 ms steps a
    task of the same loop made meanwhile (0: the loop was held the whole time)."""

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Future[None] | None = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.count += 1

    async def __aenter__(self) -> LoopTicks:
        self._task = asyncio.ensure_future(self._tick())
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._task is not None
        self._task.cancel()
