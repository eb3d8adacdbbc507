"""Talking to a judge model: any LangChain chat model or LLM, or any LlamaIndex LLM.

Models are recognised by what they can do, never by importing a framework up front:
an object with ``achat`` / ``acomplete`` is a LlamaIndex LLM, one with ``ainvoke`` is a
LangChain runnable (a chat model, an LLM, or a binding of one). Only async calls are made,
so dozens of judge calls share one event loop. The framework's message classes are imported
lazily, inside the backend that needs them.

Errors worth retrying (rate limits, timeouts, overload, HTTP 5xx) are re-raised as
:class:`TransientJudgeError` with the server's retry-after hint; others propagate as they are.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from scrutiny.core import ConfigurationError, InvalidFeedbackValue
from scrutiny.core._evaluate import retry_after_hint
from scrutiny.providers._errors import TransientJudgeError

__all__ = ["JudgeBackend", "JudgeReply", "backend_for", "is_transient", "retry_after_hint"]

_TRANSIENT_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
_TRANSIENT_NAMES = ("ratelimit", "timeout", "timedout", "toomanyrequests", "overloaded",
                    "unavailable", "internalserver", "apiconnection", "connectionerror",
                    "resourceexhausted", "throttl", "tryagain", "serviceerror")
_CUT_OFF_REASONS = frozenset({"length", "max_tokens", "max_output_tokens"})


@dataclass(frozen=True, slots=True)
class JudgeReply:
    """What a judge model answered: its text, token usage (None when not reported), and
    whether the model says it stopped at its output limit."""

    text: str
    usage: dict[str, int] | None = None
    cut_off: bool = False


JudgeBackend = Callable[[str, str], Awaitable[JudgeReply]]
"""``await backend(system, user) -> JudgeReply``: one judge call."""


# ---------------------------------------------------------------------------- errors
def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 5:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _status(exc: BaseException) -> int | None:
    for attr in ("status_code", "status", "http_status", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None) or getattr(response, "status", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def is_transient(exc: BaseException) -> bool:
    """True for errors a later attempt may not hit: 429, 5xx, timeouts, dropped connections.

    Recognised without importing any SDK: by HTTP status attributes and by the names of
    the error's classes (``RateLimitError``, ``APITimeoutError``, ``ServiceUnavailable``...),
    following ``raise ... from`` chains.
    """
    for err in _chain(exc):
        if isinstance(err, TransientJudgeError | TimeoutError | ConnectionError):
            return True
        status = _status(err)
        if status is not None and status in _TRANSIENT_STATUS:
            return True
        names = [cls.__name__.lower() for cls in type(err).__mro__]
        if any(key in name for name in names for key in _TRANSIENT_NAMES):
            return True
    return False


async def _guarded(name: str, call: Awaitable[Any]) -> Any:
    try:
        return await call
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if isinstance(exc, TransientJudgeError) or not is_transient(exc):
            raise
        detail = str(exc).strip() or type(exc).__name__
        raise TransientJudgeError(
            f"judge model {name} failed transiently ({type(exc).__name__}: {detail})",
            retry_after=retry_after_hint(exc)) from exc


# ---------------------------------------------------------------------------- replies
def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _usage_from(mapping: Any) -> dict[str, int] | None:
    """Token counts from a usage mapping or object in any of the common spellings."""
    if mapping is None:
        return None

    def get(*keys: str) -> int | None:
        for key in keys:
            value = mapping.get(key) if isinstance(mapping, Mapping) else getattr(
                mapping, key, None)
            if _int(value) is not None:
                return _int(value)
        return None

    prompt = get("input_tokens", "prompt_tokens", "prompt_token_count")
    completion = get("output_tokens", "completion_tokens", "candidates_token_count")
    total = get("total_tokens", "total_token_count")
    if prompt is None and completion is None and total is None:
        return None
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    return {k: v for k, v in usage.items() if v is not None}


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks (text parts, Anthropic-style)
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping) and isinstance(block.get("text"), str):
                parts.append(block["text"])
        return "".join(parts)
    return None


def _not_text(name: str, out: Any) -> InvalidFeedbackValue:
    return InvalidFeedbackValue(
        f"judge model {name} returned a {type(out).__name__}, not text", value=repr(out)[:2000])


# ---------------------------------------------------------------------------- LangChain
def _is_completion_llm(model: Any) -> bool:
    """A LangChain (string in, string out) LLM, possibly inside bindings."""
    while model is not None:
        if any(cls.__name__ == "BaseLLM" for cls in type(model).__mro__):
            return True
        model = getattr(model, "bound", None)
    return False


class _LangChainBackend:
    """Calls ``model.ainvoke`` with a system and a human message (a prompt for LLMs)."""

    __slots__ = ("_completion", "_model", "_system", "name")

    def __init__(self, model: Any, name: str) -> None:
        self._model = model
        self.name = name
        self._completion = _is_completion_llm(model)
        self._system: dict[str, Any] = {}

    def _messages(self, system: str, user: str) -> list[Any]:
        from langchain_core.messages import HumanMessage, SystemMessage

        cached = self._system.get(system)
        if cached is None:
            cached = self._system[system] = SystemMessage(content=system)
        return [cached, HumanMessage(content=user)]

    async def __call__(self, system: str, user: str) -> JudgeReply:
        prompt: Any = f"{system}\n\n{user}" if self._completion else self._messages(system, user)
        out = await _guarded(self.name, self._model.ainvoke(prompt))
        if isinstance(out, str):
            return JudgeReply(out)
        text = _content_text(getattr(out, "content", None))
        if text is None:
            raise _not_text(self.name, out)
        metadata = getattr(out, "response_metadata", None) or {}
        usage = _usage_from(getattr(out, "usage_metadata", None)) or _usage_from(
            metadata.get("token_usage") or metadata.get("usage"))
        reason = metadata.get("finish_reason") or metadata.get("stop_reason")
        return JudgeReply(text, usage, str(reason).lower() in _CUT_OFF_REASONS)


# ---------------------------------------------------------------------------- LlamaIndex
def _sync_underneath(model: Any, method: str) -> bool:
    """Whether `model`'s async `method` is LlamaIndex's ``CustomLLM`` default, which calls
    the blocking sync method right on the event loop (MockLLM and many community LLMs)."""
    qualname = getattr(getattr(type(model), method, None), "__qualname__", "")
    return bool(qualname == f"CustomLLM.{method}")


def _in_thread(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    """Run a blocking call on the running loop's default executor, in this context (so
    the judge's own framework calls stay unrecorded, wherever they run)."""
    ctx = contextvars.copy_context()
    return asyncio.get_running_loop().run_in_executor(None, functools.partial(ctx.run, fn,
                                                                              *args))


class _LlamaIndexBackend:
    """Calls ``llm.achat`` with a system and a user message (``acomplete`` without chat).

    A ``CustomLLM`` whose async methods are the inherited ones (they call the sync ones
    directly) is called with its sync method on a thread instead: awaited on the loop, a
    slow call froze every other evaluation and its own timeout could not fire.
    """

    __slots__ = ("_chat", "_model", "_sync", "name")

    def __init__(self, model: Any, name: str) -> None:
        self._model = model
        self.name = name
        self._chat = callable(getattr(model, "achat", None))
        self._sync = _sync_underneath(model, "achat" if self._chat else "acomplete")

    async def __call__(self, system: str, user: str) -> JudgeReply:
        model = self._model
        if self._chat:
            from llama_index.core.base.llms.types import ChatMessage, MessageRole

            messages = [ChatMessage(role=MessageRole.SYSTEM, content=system),
                        ChatMessage(role=MessageRole.USER, content=user)]
            call = _in_thread(model.chat, messages) if self._sync else model.achat(messages)
            response = await _guarded(self.name, call)
            message = getattr(response, "message", None)
            text = _content_text(getattr(message, "content", None))
        else:
            prompt = f"{system}\n\n{user}"
            call = _in_thread(model.complete, prompt) if self._sync else model.acomplete(prompt)
            response = await _guarded(self.name, call)
            text = _content_text(getattr(response, "text", None))
        if text is None:
            raise _not_text(self.name, response)
        raw = getattr(response, "raw", None)
        raw_usage = raw.get("usage") if isinstance(raw, Mapping) else getattr(raw, "usage", None)
        usage = _usage_from(raw_usage) or _usage_from(
            getattr(response, "additional_kwargs", None))
        reason = None
        if isinstance(raw, Mapping):
            choices = raw.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
                reason = choices[0].get("finish_reason")
            reason = reason or raw.get("stop_reason")
        return JudgeReply(text, usage, str(reason).lower() in _CUT_OFF_REASONS)


def model_name(model: Any) -> str:
    """A short, readable name of a model object."""
    for attr in ("model_name", "model", "model_id"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    bound = getattr(model, "bound", None)
    if bound is not None and bound is not model:
        return model_name(bound)
    return type(model).__name__


def backend_for(model: Any) -> JudgeBackend:
    """The backend that calls `model` asynchronously.

    Raises:
        ConfigurationError: `model` is neither a LangChain runnable nor a LlamaIndex LLM.
    """
    name = model_name(model)
    if callable(getattr(model, "achat", None)) or callable(getattr(model, "acomplete", None)):
        return _LlamaIndexBackend(model, name)
    if callable(getattr(model, "ainvoke", None)):
        return _LangChainBackend(model, name)
    raise ConfigurationError(
        f"LLMJudge needs a LangChain chat model or LLM (with `ainvoke`) or a LlamaIndex LLM "
        f"(with `achat` / `acomplete`); got {type(model).__name__}")
