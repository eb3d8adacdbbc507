"""Talking to a judge model: any LangChain chat model or LLM, or any LlamaIndex LLM.

Models are recognised by what they can do, never by importing a framework up front:
an object with ``achat`` / ``acomplete`` is a LlamaIndex LLM, one with ``ainvoke`` is a
LangChain runnable (a chat model, an LLM, or a binding of one). Only async calls are made,
so dozens of judge calls share one event loop. The framework's message classes are imported
lazily, inside the backend that needs them.

Errors worth retrying (rate limits, timeouts, overload, HTTP 5xx) are re-raised as
:class:`TransientJudgeError` with the server's retry-after hint — a ``retry_after``
attribute (seconds, a numeric string, a timedelta), a ``Retry-After`` / ``retry-after-ms``
header on the error or its ``response`` (OpenAI, Anthropic, httpx, aiohttp, Fern-generated
SDKs), or the wait the message names ("Please try again in 6.5s", "... in 1m30s",
Gemini's ``retryDelay``); others propagate as they are.

Token usage and whether the answer was cut off are read from what the framework reports:
a LangChain message's ``usage_metadata`` / ``response_metadata``, and the ``LLMResult`` of
the call (``llm_output["token_usage"]``, ``generation_info["finish_reason"]``), which is
all a completion LLM (a string out) reports; a LlamaIndex response's ``raw`` and
``additional_kwargs``.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import functools
import json
import re
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from scrutiny.core import ConfigurationError, InvalidFeedbackValue
from scrutiny.core._evaluate import retry_after_hint as _core_retry_after_hint
from scrutiny.core._evaluate import retry_after_seconds
from scrutiny.core._usage import read_usage
from scrutiny.providers._errors import TransientJudgeError

__all__ = ["JudgeBackend", "JudgeReply", "backend_for", "is_transient", "retry_after_hint"]

_TRANSIENT_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
_TRANSIENT_NAMES = ("ratelimit", "timeout", "timedout", "toomanyrequests", "overloaded",
                    "unavailable", "internalserver", "apiconnection", "connectionerror",
                    "resourceexhausted", "throttl", "tryagain", "serviceerror",
                    # httpx, raw under Ollama's and other clients: a dropped connection
                    # ("Server disconnected without sending a response"), a reset read
                    "networkerror", "remoteprotocolerror", "serverdisconnected")
_CUT_OFF_REASONS = frozenset({"length", "max_tokens", "max_output_tokens", "model_length"})
# where frameworks and SDKs put why the model stopped (OpenAI, Anthropic, Ollama, Bedrock)
_REASON_KEYS = ("finish_reason", "stop_reason", "done_reason", "stopReason", "finishReason")
# A duration as servers and proxies write it: "6.5s", "300ms", "20 seconds", "2h", and
# compounds: Go's "1m30s" / "1h2m3.5s", "1m 30s", "1 minute and 30 seconds". Every part is
# bounded (digits, spaces, at most six components), so a search is linear in the text.
_UNIT = (r"(?:milliseconds?|msecs?|ms|hours?|hrs?|h|minutes?|mins?|m|seconds?|secs?|s)"
         r"(?![a-z])")  # ("m" then "30s" is minutes; "5 messages" is no unit)
_PART = rf"\d{{1,12}}(?:\.\d{{1,9}})?\s{{0,2}}{_UNIT}"
_DURATION = rf"{_PART}(?:,?\s{{0,3}}(?:and\s{{1,3}})?{_PART}){{0,5}}"
# "Please try again in 6.5s" (OpenAI), "Please retry in 23.4s" (Gemini), "retry after 20
# seconds", "try again in 1m30s", "'retryDelay': '23s'" (Google's RetryInfo)
_HINT_IN_TEXT = re.compile(
    rf"(?:try again|retry|retrying)(?: after| in)\s{{1,3}}({_DURATION})"
    r"|retry_?delay['\"]?\s{0,3}[:=]\s{0,3}['\"]?(\d{1,12}(?:\.\d{1,9})?)s",
    re.IGNORECASE)
_PART_IN_DURATION = re.compile(rf"(\d{{1,12}}(?:\.\d{{1,9}})?)\s{{0,2}}({_UNIT})",
                               re.IGNORECASE)


def _seconds_in(duration: str) -> float:
    """The seconds a duration matched by `_DURATION` names (its parts summed)."""
    total = 0.0
    for number, unit in _PART_IN_DURATION.findall(duration):
        unit = unit.lower()
        if unit.startswith(("ms", "milli")):
            scale = 0.001
        elif unit.startswith("h"):
            scale = 3600.0
        elif unit.startswith("m"):
            scale = 60.0
        else:
            scale = 1.0
        total += float(number) * scale
    return total


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
    if isinstance(response, Mapping):  # (botocore's ClientError: a parsed response dict)
        meta = response.get("ResponseMetadata")
        value = meta.get("HTTPStatusCode") if isinstance(meta, Mapping) else None
    else:
        value = getattr(response, "status_code", None) or getattr(response, "status", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _error_code(exc: BaseException) -> str:
    """The service's error code when the error carries one in a response dict (botocore:
    ``{"Error": {"Code": "ThrottlingException"}}``, the class being a generic
    ClientError), lowercased; else ""."""
    response = getattr(exc, "response", None)
    error = response.get("Error") if isinstance(response, Mapping) else None
    code = error.get("Code") if isinstance(error, Mapping) else None
    return code.lower() if isinstance(code, str) else ""


def is_transient(exc: BaseException) -> bool:
    """True for errors a later attempt may not hit: 429, 5xx, timeouts, dropped connections.

    Recognised without importing any SDK: by HTTP status attributes and by the names of
    the error's classes (``RateLimitError``, ``APITimeoutError``, ``ServiceUnavailable``,
    httpx's ``NetworkError`` and ``RemoteProtocolError``...) or, for botocore's generic
    ``ClientError``, of its error code (``ThrottlingException``...) and the HTTP status in
    its response dict; following ``raise ... from`` chains.
    """
    for err in _chain(exc):
        if _out_of_quota(err):  # (429 too, but no wait ends it: it was retried 4 times)
            return False
        if isinstance(err, TransientJudgeError | TimeoutError | ConnectionError):
            return True
        status = _status(err)
        if status is not None and status in _TRANSIENT_STATUS:
            return True
        names = [cls.__name__.lower() for cls in type(err).__mro__]
        names.append(_error_code(err))  # (Bedrock's throttling has no class of its own)
        if any(key in name for name in names for key in _TRANSIENT_NAMES):
            return True
    return False


def _out_of_quota(err: BaseException) -> bool:
    """An account out of credit (OpenAI's 429 ``insufficient_quota``, a billing error):
    retrying cannot help until someone pays."""
    code = getattr(err, "code", None)
    body = getattr(err, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        code = code or (inner.get("code") or inner.get("type")
                        if isinstance(inner, Mapping) else None)
    text = f"{code or ''} {err}".lower()
    # (not Gemini's per-minute "exceeded your current quota ... retry in 30s": a wait ends)
    return "insufficient_quota" in text or "plan and billing" in text


def _header(headers: Any, *names: str) -> Any:
    for name in names:
        try:
            value = headers.get(name)
        except (AttributeError, TypeError):
            return None
        if value is not None:
            return value
    return None


def _hint_of(err: BaseException) -> float | None:
    """The hint one error carries, in any of the shapes the core does not read."""
    for attr in ("retry_after", "retry_after_seconds"):
        value = getattr(err, attr, None)
        if isinstance(value, datetime.timedelta):
            return max(0.0, value.total_seconds())
        if isinstance(value, str | bytes):
            seconds = retry_after_seconds(value.decode() if isinstance(value, bytes) else value)
            if seconds is not None:
                return seconds
    headers = getattr(err, "headers", None)  # aiohttp's ClientResponseError, Fern SDKs
    if headers is not None:
        millis = _header(headers, "retry-after-ms", "Retry-After-Ms")
        try:
            if millis is not None and float(millis) >= 0:
                return float(millis) / 1000.0
        except (TypeError, ValueError):
            pass
        seconds = retry_after_seconds(_header(headers, "retry-after", "Retry-After",
                                              "RETRY-AFTER"))
        if seconds is not None:
            return seconds
    match = _HINT_IN_TEXT.search(str(err)[:4000])
    if match:
        if match.group(2):
            return float(match.group(2))
        return _seconds_in(match.group(1))
    return None


def retry_after_hint(exc: BaseException) -> float | None:
    """Seconds the server asked to wait, if `exc` (or an exception it was raised from) says:
    what the core reads (a numeric ``retry_after``, a ``Retry-After`` / ``retry-after-ms``
    header on ``exc.response``), then a ``retry_after`` string or timedelta, the headers on
    the error itself, and the wait its message names."""
    hint = _core_retry_after_hint(exc)
    if hint is not None:
        return hint
    for err in _chain(exc):
        hint = _hint_of(err)
        if hint is not None:
            return hint
    return None


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
def _usage_from(mapping: Any) -> dict[str, int] | None:
    """Token counts from a usage mapping or object in any of the common spellings (see
    `scrutiny.core._usage`: the cache reads of Anthropic, the thinking of Gemini, ...)."""
    usage = read_usage(mapping)
    if usage is None:
        return None
    return {k: v for k, v in usage.as_dict().items() if v is not None}


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


def _structured(out: Any) -> str | None:
    """A verdict given as data — a mapping or a pydantic model with a score, what
    ``with_structured_output`` and a verdict tool's call give — as the JSON the parser
    reads; None for anything else."""
    dump = getattr(out, "model_dump", None)
    if callable(dump) and not hasattr(out, "content"):
        try:
            out = dump()
        except Exception:
            return None
    if not isinstance(out, Mapping) or not any(
            isinstance(k, str) and "score" in k.lower() for k in out):
        return None
    try:
        return json.dumps(out, default=str)
    except (TypeError, ValueError):
        return None


def _refusal(out: Any) -> str | None:
    """What a model said in refusing, when its answer has no text: OpenAI's ``refusal``
    (in ``additional_kwargs`` or a content block), Anthropic's ``stop_reason="refusal"``.
    These failed as "the judge gave an empty answer", the refusal dropped."""
    extra = getattr(out, "additional_kwargs", None)
    if isinstance(extra, Mapping) and isinstance(extra.get("refusal"), str):
        return str(extra["refusal"])
    content = getattr(out, "content", None)
    if isinstance(content, list):
        for block in content:
            if isinstance(block, Mapping) and block.get("type") == "refusal":
                return str(block.get("refusal") or block.get("text") or "(no text)")
    reason = _stop_reason(getattr(out, "response_metadata", None))
    if reason is not None and "refus" in str(reason).lower():
        return f"(no text; the model stopped with {reason!r})"
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


def _stop_reason(metadata: Any) -> Any:
    if not isinstance(metadata, Mapping):
        return None
    return next((metadata[k] for k in _REASON_KEYS if metadata.get(k)), None)


def _cut_off(reason: Any) -> bool:
    return reason is not None and str(reason).lower().rsplit(".", 1)[-1] in _CUT_OFF_REASONS


@functools.cache
def _collector_class() -> type:
    """A LangChain callback handler that keeps what a call's ``LLMResult`` reports (the
    class is made on first use: importing this module imports no LangChain)."""
    from langchain_core.callbacks import BaseCallbackHandler

    class _Collector(BaseCallbackHandler):
        run_inline = True

        def __init__(self) -> None:
            self.usage: dict[str, int] | None = None
            self.cut_off = False
            self._lock = threading.Lock()

        def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            usage = None
            per_generation: list[dict[str, int]] = []
            for gens in getattr(response, "generations", None) or ():
                choices = []  # (one list of choices per prompt)
                for gen in gens:
                    message = getattr(gen, "message", None)
                    choices.append(_usage_from(getattr(message, "usage_metadata", None)))
                    info = getattr(gen, "generation_info", None)
                    reason = _stop_reason(info) or _stop_reason(
                        getattr(message, "response_metadata", None))
                    if _cut_off(reason):
                        self.cut_off = True
                reported = [u for u in choices if u]
                if reported and all(u == reported[0] for u in reported):
                    # One response's usage on each of its choices (a model asked for n
                    # answers: langchain-openai puts it on every one): it counts once.
                    per_generation.append(reported[0])
                else:
                    per_generation.extend(reported)
            if per_generation:
                usage = _summed(per_generation)
            else:
                out = getattr(response, "llm_output", None) or {}
                usage = _usage_from(out.get("token_usage") or out.get("usage")) if isinstance(
                    out, Mapping) else None
            if usage:
                with self._lock:
                    self.usage = _summed([self.usage, usage] if self.usage else [usage])

    return _Collector


def _summed(usages: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for usage in usages:
        for key, value in usage.items():
            total[key] = total.get(key, 0) + value
    return total


class _LangChainBackend:
    """Calls ``model.ainvoke`` with a system and a human message (a prompt for LLMs).

    For anything but a chat model, a callback handler for the one call collects its
    ``LLMResult``: a completion LLM returns a bare string, so its token usage
    (``llm_output``) and finish reason exist only there; and a runnable around a model
    reports every model call it made.
    """

    __slots__ = ("_completion", "_model", "_runnable", "_system", "name")

    def __init__(self, model: Any, name: str) -> None:
        self._model = model
        self.name = name
        self._completion = _is_completion_llm(model)
        # The collector costs a callback run per call (a quarter of a judge call's CPU):
        # a chat model's message carries its usage and finish reason already; a completion
        # LLM, a runnable around a model (a binding, a chain) and the like need it. (An
        # object that only looks like a runnable takes no config.)
        names = {cls.__name__ for cls in type(model).__mro__}
        self._runnable = "Runnable" in names and "BaseChatModel" not in names
        self._system: dict[str, Any] = {}

    def _messages(self, system: str, user: str) -> list[Any]:
        from langchain_core.messages import HumanMessage, SystemMessage

        cached = self._system.get(system)
        if cached is None:
            cached = self._system[system] = SystemMessage(content=system)
        return [cached, HumanMessage(content=user)]

    async def __call__(self, system: str, user: str) -> JudgeReply:
        prompt: Any = f"{system}\n\n{user}" if self._completion else self._messages(system, user)
        collector = _collector_class()() if self._runnable else None
        call = self._model.ainvoke(prompt) if collector is None else \
            self._model.ainvoke(prompt, config={"callbacks": [collector]})
        out = await _guarded(self.name, call)
        usage, cut_off = (None, False) if collector is None else (collector.usage,
                                                                   collector.cut_off)
        if isinstance(out, str):
            return JudgeReply(out, usage, cut_off)
        verdict = _structured(out)
        if verdict is not None:  # (model.with_structured_output(Verdict): no message)
            return JudgeReply(verdict, usage, cut_off)
        text = _content_text(getattr(out, "content", None))
        if text is None:
            raise _not_text(self.name, out)
        if not text.strip():
            refused = _refusal(out)
            if refused is not None:
                raise InvalidFeedbackValue(f"the judge model refused to judge: {refused}",
                                           value=refused[:2000])
            # (a model bound to a verdict tool answers with the tool call alone)
            text = next((verdict for call in getattr(out, "tool_calls", None) or ()
                         if (verdict := _structured(call.get("args")
                                                    if isinstance(call, Mapping) else None))),
                        text)
        metadata = getattr(out, "response_metadata", None) or {}
        usage = usage or _usage_from(getattr(out, "usage_metadata", None)) or \
            _usage_from(metadata.get("token_usage") or metadata.get("usage"))
        return JudgeReply(text, usage, cut_off or _cut_off(_stop_reason(metadata)))


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
        usage = None
        for key in ("usage", "usage_metadata"):  # (OpenAI & co.; Gemini's usage_metadata)
            found = raw.get(key) if isinstance(raw, Mapping) else getattr(raw, key, None)
            usage = usage or _usage_from(found)
        usage = usage or _usage_from(getattr(response, "additional_kwargs", None))
        reason = None
        choices = raw.get("choices") if isinstance(raw, Mapping) else getattr(raw, "choices",
                                                                              None)
        if isinstance(choices, list) and choices:
            first = choices[0]
            reason = first.get("finish_reason") if isinstance(first, Mapping) else getattr(
                first, "finish_reason", None)
        if reason is None:
            reason = _stop_reason(raw) if isinstance(raw, Mapping) else next(
                (getattr(raw, k) for k in _REASON_KEYS if getattr(raw, k, None)), None)
        return JudgeReply(text, usage, _cut_off(reason))


def model_name(model: Any) -> str:
    """A short, readable name of a model object."""
    for attr in ("model_name", "model", "model_id"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    bound = getattr(model, "bound", None)
    if bound is not None and bound is not model:
        return model_name(bound)
    first = getattr(model, "first", None)  # (a sequence: with_structured_output's)
    if first is not None and first is not model and hasattr(model, "steps"):
        return model_name(first)
    return type(model).__name__


def backend_for(model: Any) -> JudgeBackend:
    """The backend that calls `model` asynchronously.

    Raises:
        ConfigurationError: `model` is neither a LangChain runnable nor a LlamaIndex LLM
            (or is a model class, not an instance).
    """
    if isinstance(model, type):  # (its methods are there, unbound: every call failed later)
        raise ConfigurationError(
            f"LLMJudge needs a model instance, not the class {model.__name__}: create the "
            f"model first, e.g. LLMJudge({model.__name__}(...)) with its settings")
    name = model_name(model)
    if callable(getattr(model, "achat", None)) or callable(getattr(model, "acomplete", None)):
        return _LlamaIndexBackend(model, name)
    if callable(getattr(model, "ainvoke", None)):
        return _LangChainBackend(model, name)
    raise ConfigurationError(
        f"LLMJudge needs a LangChain chat model or LLM (with `ainvoke`) or a LlamaIndex LLM "
        f"(with `achat` / `acomplete`); got {type(model).__name__}")
