"""Feedback functions the benchmark workers import by path."""

from __future__ import annotations

import asyncio


async def wait_50ms(output: str) -> float:
    await asyncio.sleep(0.05)
    return 1.0
