"""TruLens names over Scrutiny: code written for TruLens runs with only its imports changed.

    from scrutiny.compat.trulens import TruSession, TruChain, TruLlama, Feedback, Select

covers the common surface: ``TruSession()`` (``get_records_and_feedback``,
``get_leaderboard``, ``reset_database``, ``run_dashboard``, ``wait_for_feedback_results``),
``Feedback(fn, name=..., higher_is_better=...).on_input_output()`` / ``.on_input()`` /
``.on_output()`` / ``.on(...)`` / ``.aggregate(...)``, ``Select.RecordInput``,
``Select.RecordOutput``, ``TruChain.select_context(app)`` and
``TruLlama.select_source_nodes()`` (both the retrieved contexts), ``TruChain(app,
app_name=..., app_version=..., feedbacks=[...])`` and ``TruLlama(...)`` used as
``with tru as recording: ...``, ``recording.get()``,
``response, record = tru.with_record(chain.invoke, question)`` (and ``awith_record``) and
``record.wait_for_feedback_results()``. TruLens lenses into arbitrary call paths
(``Select.RecordCalls...``) have no equivalent: use ``Select.spans(kind=..., name=...)`` or a
``callable(record)`` instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from scrutiny.core import ConfigurationError, Feedback, Record, Select, Selector, Session

__all__ = ["Feedback", "Select", "TruChain", "TruLlama", "TruSession"]


class TruSession(Session):
    """A :class:`Session` with TruLens's method names."""

    def reset_database(self) -> int:
        """Delete every stored record and result (TruLens's semantics); returns the count."""
        return self.delete_records(before=datetime.max.replace(tzinfo=timezone.utc))

    def wait_for_feedback_results(self, feedback_timeout: float | None = None) -> bool:
        """Wait until every feedback accepted so far has a stored end state."""
        return self.wait_for_feedback(feedback_timeout)


def _recorder_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    app_id = kwargs.pop("app_id", None)
    if app_id and "app_name" not in kwargs:
        kwargs["app_name"] = app_id
    for unsupported in ("selector_check_warning", "main_method", "selector_nocheck"):
        kwargs.pop(unsupported, None)
    return kwargs


_NO_RECORD_METADATA = (
    "with_record(record_metadata=...) is not supported: the record is stored as the call "
    "ends, before it could be added. Give the recorder metadata={...} (every record), or "
    "a LangChain call config={'metadata': {...}} (that record)")


class _WithRecord:
    """TruLens's ``with_record`` / ``awith_record`` on a recorder."""

    def with_record(self, func: Callable[..., Any], *args: Any,
                    record_metadata: dict[str, Any] | None = None,
                    **kwargs: Any) -> tuple[Any, Record]:
        """Call ``func(*args, **kwargs)`` recorded; ``(its result, the record)``."""
        if record_metadata:
            raise ConfigurationError(_NO_RECORD_METADATA)
        with self as recording:  # type: ignore[attr-defined]
            result = func(*args, **kwargs)
        return result, recording.get()

    async def awith_record(self, func: Callable[..., Awaitable[Any]], *args: Any,
                           record_metadata: dict[str, Any] | None = None,
                           **kwargs: Any) -> tuple[Any, Record]:
        """The async form of :meth:`with_record`."""
        if record_metadata:
            raise ConfigurationError(_NO_RECORD_METADATA)
        async with self as recording:  # type: ignore[attr-defined]
            result = await func(*args, **kwargs)
        return result, recording.get()


class _TruChainFactory:
    """``TruChain(app, app_name=..., app_version=..., feedbacks=[...])``: a ChainRecorder
    with ``with_record`` / ``awith_record``."""

    def __call__(self, app: Any, **kwargs: Any) -> Any:
        from scrutiny.integrations.langchain import ChainRecorder

        recorder_class = type("TruChain", (_WithRecord, ChainRecorder), {})
        return recorder_class(app, **_recorder_kwargs(kwargs))

    @staticmethod
    def select_context(app: Any = None) -> Selector:
        """The retrieved contexts (each one; ``.collect()`` for the list)."""
        return Select.contexts


class _TruLlamaFactory:
    """``TruLlama(engine, app_name=..., app_version=..., feedbacks=[...])``."""

    def __call__(self, app: Any, **kwargs: Any) -> Any:
        from scrutiny.integrations.llama_index import LlamaIndexRecorder

        recorder_class = type("TruLlama", (_WithRecord, LlamaIndexRecorder), {})
        return recorder_class(app, **_recorder_kwargs(kwargs))

    @staticmethod
    def select_context(app: Any = None) -> Selector:
        """The retrieved contexts (each one; ``.collect()`` for the list)."""
        return Select.contexts

    select_source_nodes = select_context


TruChain = _TruChainFactory()
TruLlama = _TruLlamaFactory()
