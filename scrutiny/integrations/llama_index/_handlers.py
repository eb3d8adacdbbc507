"""The span and event handlers Scrutiny adds to LlamaIndex's root dispatcher.

They are added on first use of a recorder (never at import), once per process, and stay:
outside a ``with recorder:`` block they only look up a span id and return. Each notice is
forwarded to the process-wide :class:`Tracer`; a failure inside Scrutiny is logged (the
dispatcher would swallow it silently) and never reaches the application.
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any

from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.span import SimpleSpan
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler

from scrutiny.core import Session
from scrutiny.core._runtime import open_call_counters
from scrutiny.integrations.llama_index._tracer import Tracer

__all__ = ["ScrutinyEventHandler", "ScrutinySpanHandler", "ensure_installed", "tracer"]

logger = logging.getLogger("scrutiny")

tracer = Tracer()
"""The one tracer of this process."""


def _open_calls(session: Session) -> int:
    """Recorded calls under way (or their streams) whose record goes to `session` (see
    Session.aclose)."""
    traces = {id(trace): trace for members in list(tracer.members.values())
              for _span, trace, _own in members}
    traces.update((id(trace), trace) for trace in list(tracer.model_streams))
    return sum(1 for trace in traces.values()
               if not trace.finished and trace.scope.recorder.settings.uses(session))


open_call_counters.append(_open_calls)

_failures: set[str] = set()


def _log_failure(where: str) -> None:
    """Log a failure of ours: the first one of each kind with its traceback, then briefly."""
    if where in _failures:
        logger.debug("scrutiny: LlamaIndex %s failed again", where, exc_info=True)
        return
    _failures.add(where)
    logger.exception("scrutiny: LlamaIndex %s failed; the application is not affected "
                     "(further failures of this kind are logged at DEBUG)", where)


class ScrutinySpanHandler(BaseSpanHandler[SimpleSpan]):
    """Forwards span notices to the tracer; keeps no spans of its own (`open_spans` stays empty)."""

    @classmethod
    def class_name(cls) -> str:
        return "ScrutinySpanHandler"

    def span_enter(self, id_: str, bound_args: inspect.BoundArguments,
                   instance: Any | None = None, parent_id: str | None = None,
                   tags: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:
            tracer.enter(id_, bound_args.arguments, instance, parent_id, tags)
        except Exception:
            _log_failure("span enter")

    def span_exit(self, id_: str, bound_args: inspect.BoundArguments,
                  instance: Any | None = None, result: Any | None = None,
                  **kwargs: Any) -> None:
        try:
            tracer.exit(id_, instance, result)
        except Exception:
            _log_failure("span exit")

    def span_drop(self, id_: str, bound_args: inspect.BoundArguments,
                  instance: Any | None = None, err: BaseException | None = None,
                  **kwargs: Any) -> None:
        try:
            tracer.drop(id_, instance, err)
        except Exception:
            _log_failure("span drop")

    # The base class's hooks, unused: the notices above do not call them.
    def new_span(self, id_: str, bound_args: inspect.BoundArguments,
                 instance: Any | None = None, parent_span_id: str | None = None,
                 tags: dict[str, Any] | None = None, **kwargs: Any) -> SimpleSpan | None:
        return None

    def prepare_to_exit_span(self, id_: str, bound_args: inspect.BoundArguments,
                             instance: Any | None = None, result: Any | None = None,
                             **kwargs: Any) -> SimpleSpan | None:
        return None

    def prepare_to_drop_span(self, id_: str, bound_args: inspect.BoundArguments,
                             instance: Any | None = None, err: BaseException | None = None,
                             **kwargs: Any) -> SimpleSpan | None:
        return None


class ScrutinyEventHandler(BaseEventHandler):
    """Forwards events of recorded spans to the tracer (model names, usage, stream deltas)."""

    @classmethod
    def class_name(cls) -> str:
        return "ScrutinyEventHandler"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if not tracer.members and not tracer.runs:
            return
        try:
            tracer.event(event)
        except Exception:
            _log_failure("event handling")


_install_lock = threading.Lock()
_span_handler: ScrutinySpanHandler | None = None
_event_handler: ScrutinyEventHandler | None = None


def ensure_installed() -> None:
    """Add the handlers to the root dispatcher unless they are there (idempotent)."""
    global _span_handler, _event_handler
    dispatcher = get_dispatcher()
    sh, eh = _span_handler, _event_handler
    if sh is not None and eh is not None and \
            any(h is sh for h in dispatcher.span_handlers) and \
            any(h is eh for h in dispatcher.event_handlers):
        return
    with _install_lock:
        if _span_handler is None:
            _span_handler = ScrutinySpanHandler()
        if _event_handler is None:
            _event_handler = ScrutinyEventHandler()
        if not any(h is _span_handler for h in dispatcher.span_handlers):
            dispatcher.add_span_handler(_span_handler)
        if not any(h is _event_handler for h in dispatcher.event_handlers):
            dispatcher.add_event_handler(_event_handler)
