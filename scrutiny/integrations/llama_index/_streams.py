"""Token streams that stay inside their record.

A streaming query returns before its LLM is called: the root span has already ended when
the consumer pulls the first token, so LlamaIndex would make the LLM spans new roots. The
wrappers here put the root's span id back in `active_span_id` around each step of the
original generator (so the LLM spans become children of the root), collect the tokens, and
report the end of the stream exactly once — exhausted, failed, stopped early, or dropped
without ever being consumed.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from typing import Any

from llama_index.core.instrumentation.span import active_span_id

from scrutiny.core._runtime import end_when_dropped

__all__ = ["StreamEnd", "traced_agen", "traced_gen"]

StreamEnd = Callable[[BaseException | None, bool], object]
"""`end(error, complete)`: called once; `complete` is True when the stream was exhausted."""


def traced_gen(gen: Iterator[Any], span_id: str, tokens: list[Any],
               end: StreamEnd) -> Generator[Any, None, None]:
    """Iterate `gen` with `span_id` active, appending each token to `tokens`."""

    def run() -> Generator[Any, None, None]:
        error: BaseException | None = None
        complete = False
        try:
            while True:
                reset = active_span_id.set(span_id)
                try:
                    item = next(gen)
                except StopIteration:
                    complete = True
                    return
                finally:
                    active_span_id.reset(reset)
                tokens.append(item)
                yield item
        except GeneratorExit:  # the consumer stopped early
            close = getattr(gen, "close", None)
            if callable(close):
                close()
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            end(error, complete)

    wrapped = run()
    # A stream that is never started is closed without running `run`'s body.
    end_when_dropped(wrapped, end, None, False)
    return wrapped


def traced_agen(agen: AsyncIterator[Any], span_id: str, tokens: list[Any],
                end: StreamEnd) -> AsyncGenerator[Any, None]:
    """The async form of :func:`traced_gen`."""

    async def run() -> AsyncGenerator[Any, None]:
        error: BaseException | None = None
        complete = False
        try:
            while True:
                reset = active_span_id.set(span_id)
                try:
                    item = await agen.__anext__()
                except StopAsyncIteration:
                    complete = True
                    return
                finally:
                    active_span_id.reset(reset)
                tokens.append(item)
                yield item
        except GeneratorExit:
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            end(error, complete)

    wrapped = run()
    end_when_dropped(wrapped, end, None, False)
    return wrapped
