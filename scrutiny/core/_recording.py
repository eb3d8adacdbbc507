"""What a recorder's ``with`` block collects, shared by the framework integrations."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

from scrutiny.core._errors import RecordingError
from scrutiny.core._records import Record
from scrutiny.core._session import FeedbackMode

__all__ = ["Recording"]

_FINALIZE_TURNS = 50


class Recording:
    """The records made inside one ``with recorder as recording:`` block.

    Args:
        feedback_mode: the recorder's mode (None: the session's).
        open_hint: said when `get()` finds no record while calls are still open.
        empty_hint: said when `get()` finds no record at all.
    """

    def __init__(self, feedback_mode: FeedbackMode | None, *, open_hint: str = "",
                 empty_hint: str = "") -> None:
        self.feedback_mode = feedback_mode
        self._records: list[Record] = []
        self._open = 0  # recorded calls started in the block whose record is not made yet
        self._lock = threading.Lock()
        self._open_hint = open_hint
        self._empty_hint = empty_hint

    def _opened(self) -> None:
        with self._lock:
            self._open += 1

    def _add(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)
            self._open = max(0, self._open - 1)

    @property
    def open_calls(self) -> int:
        """Recorded calls started in the block whose record is not made yet (e.g. a
        streamed answer that is still being consumed)."""
        with self._lock:
            return self._open

    @property
    def records(self) -> list[Record]:
        """Every record made in the block, in the order the calls ended."""
        with self._lock:
            return list(self._records)

    def get(self) -> Record:
        """The one record of the block.

        Raises:
            RecordingError: the block made no record, or several (use `.records`).
        """
        records = self.records
        if len(records) == 1:
            return records[0]
        if not records:
            still_open = self.open_calls
            if still_open:
                raise RecordingError(
                    f"no record yet: {still_open} recorded call(s) started in this "
                    f"recording have not ended; {self._open_hint}".rstrip("; "))
            raise RecordingError(
                f"no record was made in this recording; {self._empty_hint}".rstrip("; "))
        raise RecordingError(
            f"this recording holds {len(records)} records; use recording.records or "
            "recording[i]")

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    # ------------------------------------------------------------------ leaving the block
    def finish(self, mode: FeedbackMode) -> None:
        """On leaving a ``with`` block: in mode `with_app`, wait for every result."""
        if mode is FeedbackMode.WITH_APP:
            for record in self.records:
                record.wait_for_feedback_results()

    async def afinish(self, mode: FeedbackMode) -> None:
        """On leaving an ``async with`` block.

        An async stream the consumer left early ends only when the event loop finalizes its
        generators, a few loop turns later: the loop gets those turns first, so the block's
        record is there when it is left. In mode `with_app`, then waits for every result
        without blocking the loop.
        """
        for _ in range(_FINALIZE_TURNS):
            if self.open_calls == 0:
                break
            await asyncio.sleep(0)
        if mode is FeedbackMode.WITH_APP:
            await asyncio.gather(*(r.await_feedback_results() for r in self.records))
