"""Reading LlamaIndex values: span kinds, main input and output, nodes, token usage.

These run on the application's thread, so they only look at the shape of values: attribute
reads and `isinstance` checks, no copying of payloads and no serialization (the one
exception, :meth:`SpanInputs.model_dump`, runs on Scrutiny's writer thread).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    ToolCallBlock,
)
from llama_index.core.base.response.schema import (
    AsyncStreamingResponse,
    PydanticResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.chat_engine.types import (
    AgentChatResponse,
    BaseChatEngine,
    StreamingAgentChatResponse,
)
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.node_parser.interface import NodeParser
from llama_index.core.prompts.base import BasePromptTemplate
from llama_index.core.response_synthesizers.base import BaseSynthesizer
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from llama_index.core.tools.types import BaseTool

from scrutiny.core import SpanKind, TokenUsage
from scrutiny.core._usage import first_usage

__all__ = [
    "SpanInputs",
    "answer_of",
    "embedding_view",
    "event_text",
    "is_event",
    "kind_of",
    "llm_text",
    "main_input",
    "main_output",
    "name_and_kind",
    "node_text",
    "nodes_view",
    "span_name",
    "span_output",
    "token_text",
    "usage_of",
]

_UUID_TAIL = 37  # "-" + str(uuid4())
_INPUT_KEYS = ("str_or_query_bundle", "message", "query_str", "query_bundle", "query",
               "prompt", "messages")

_KINDS: tuple[tuple[type, str], ...] = (
    (BaseQueryEngine, SpanKind.QUERY.value),
    (BaseChatEngine, SpanKind.QUERY.value),
    (BaseRetriever, SpanKind.RETRIEVER.value),
    (BaseEmbedding, SpanKind.EMBEDDING.value),
    (BaseTool, SpanKind.TOOL.value),
    (BaseSynthesizer, SpanKind.SYNTHESIZE.value),
    (NodeParser, SpanKind.PARSER.value),
    (BasePromptTemplate, SpanKind.PROMPT.value),
)
_kind_cache: dict[tuple[type, str], str] = {}
_name_kind_cache: dict[tuple[type, str], tuple[str, str]] = {}


def span_name(span_id: str) -> str:
    """``"RetrieverQueryEngine.query-<uuid4>"`` -> ``"RetrieverQueryEngine.query"``."""
    if len(span_id) > _UUID_TAIL and span_id[-_UUID_TAIL] == "-":
        return span_id[:-_UUID_TAIL]
    return span_id


def name_and_kind(span_id: str, instance: Any) -> tuple[str, str]:
    """The span's name (its id without the uuid) and :class:`SpanKind` value, cached."""
    name = span_name(span_id)
    key = (type(instance), name)
    known = _name_kind_cache.get(key)
    if known is None:
        known = (name, kind_of(instance, name.rpartition(".")[2]))
        if len(_name_kind_cache) < 10_000:
            _name_kind_cache[key] = known
    return known


def kind_of(instance: Any, method: str) -> str:
    """The :class:`SpanKind` value of a call of `method` on `instance` (cached per type)."""
    if instance is None:
        return SpanKind.OTHER.value
    key = (type(instance), method)
    kind = _kind_cache.get(key)
    if kind is None:
        kind = SpanKind.OTHER.value
        if isinstance(instance, BaseLLM):
            if not method.startswith("_"):  # (not `_prepare_chat_with_tools`: no model call)
                kind = SpanKind.CHAT_MODEL.value if "chat" in method else SpanKind.LLM.value
        else:
            for cls, value in _KINDS:
                if isinstance(instance, cls):
                    kind = value
                    break
            if kind == SpanKind.RETRIEVER.value and method.startswith("_"):
                # (`retrieve` calling its own `_retrieve` is one retrieval: both were
                # retriever spans, so a feedback per retrieval ran twice and a count of
                # the retrieved nodes doubled)
                kind = SpanKind.OTHER.value
        _kind_cache[key] = kind
    return kind


class SpanInputs(Mapping[str, Any]):
    """The arguments of a span's call, read-only and as given.

    Holding them costs the application nothing; when the record is stored (on Scrutiny's
    writer thread) they are reduced to a light plain form by :meth:`model_dump`: nodes to
    their ids and scores, query bundles to their query string (not their embedding), prompt
    templates to their text, chat messages to role and content.
    """

    __slots__ = ("_arguments",)

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        self._arguments = arguments

    def __getitem__(self, key: str) -> Any:
        return self._arguments[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arguments)

    def __len__(self) -> int:
        return len(self._arguments)

    def __repr__(self) -> str:
        return f"SpanInputs({dict(self._arguments)!r})"

    def as_given(self) -> SpanInputs:
        """These arguments with the lists among them copied, for a recorded call's root
        span: what it was given, although the callee may append to a list it was passed
        (a chat engine keeps the `chat_history` it is given as its memory)."""
        arguments = self._arguments
        if not any(type(v) is list for v in arguments.values()):
            return self
        return SpanInputs({k: list(v) if type(v) is list else v for k, v in arguments.items()})

    def model_dump(self, **_: Any) -> dict[str, Any]:
        """The stored form (Scrutiny's serializer calls this off the application's thread)."""
        return {key: _stored(value, 2) for key, value in self._arguments.items()}


def _stored(value: Any, depth: int) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, NodeWithScore):
        return {"node_id": value.node.node_id, "score": value.score}
    if isinstance(value, QueryBundle):
        return value.query_str
    if isinstance(value, ChatMessage):
        return {"role": str(value.role.value), "content": value.content}
    if isinstance(value, BasePromptTemplate):
        try:
            return {"prompt_template": value.get_template()}
        except Exception:
            return {"prompt_template": type(value).__name__}
    if depth > 0 and isinstance(value, list | tuple):
        return [_stored(v, depth - 1) for v in value]
    if depth > 0 and isinstance(value, Mapping):
        return {str(k): _stored(v, depth - 1) for k, v in value.items()}
    return value


def _query_text(value: Any) -> Any:
    if isinstance(value, QueryBundle):
        return value.query_str
    if isinstance(value, list) and value and all(isinstance(m, ChatMessage) for m in value):
        users = [m for m in value if str(m.role.value) == "user"]
        value = (users or value)[-1]  # an LLM's chat messages: the last user message
    content = getattr(value, "content", None)  # a ChatMessage
    if isinstance(content, str) and hasattr(value, "role"):
        return content
    return value


def main_input(arguments: Mapping[str, Any]) -> Any:
    """The question a user would name: the query string or the chat message (or, for a
    workflow or an agent, what its start event was given)."""
    for key in _INPUT_KEYS:
        if key in arguments:
            return _query_text(arguments[key])
    start = arguments.get("start_event")
    if is_event(start, "StartEvent"):  # a workflow run: (init_state, start_event, tags)
        return _start_text(start)
    if start is None and "start_event" in arguments and "init_state" in arguments:
        # a run resumed from a saved context (`wf.run(ctx=Context.from_dict(...))`): not
        # its runtime state; what it was resumed with is known from its steps (see
        # `Trace.step_started`)
        return None
    args = arguments.get("args")
    if isinstance(args, tuple) and args and arguments.keys() <= {"args", "kwargs"}:
        # a call through a wrapper taking (*args, **kwargs): its first positional argument
        # (`llm.complete("...")`, the `stream_complete` an async stream reads)
        return _query_text(args[0])
    if len(arguments) == 1:
        return _query_text(next(iter(arguments.values())))
    return dict(arguments) or None


_EVENT_INPUT_KEYS = ("user_msg", "query", "query_str", "question", "input", "message", "msg",
                     "prompt", "topic")


def is_event(value: Any, kind: str) -> bool:
    """Whether `value` is a LlamaIndex workflow event of class `kind` (or a subclass): by
    name, so that workflows stay optional."""
    return value is not None and any(c.__name__ == kind for c in type(value).__mro__)


def event_text(event: Any) -> Any:
    """What a workflow event says, as a run's input: a start event's question, a human's
    response (`HumanResponseEvent.response`), an input request's prompt, ..."""
    return _start_text(event)


def _start_text(event: Any) -> Any:
    """What a workflow was asked: `user_msg` of an agent, `query` of a RAG workflow, ...;
    else the one value it was given, else all of them. (The whole run's arguments were the
    input: runtime state with the question buried in it.)"""
    for key in _EVENT_INPUT_KEYS:
        try:
            value = getattr(event, key, None)
        except Exception:
            value = None
        if value is not None:
            return _query_text(value)
    given = _event_values(event)
    history = given.get("chat_history")
    if isinstance(history, list) and history and all(
            isinstance(m, ChatMessage) for m in history):
        # an agent run given the conversation rather than a message (a stateless chat
        # API): what it is asked is the conversation's last user message
        return _query_text(history)
    if not given:
        return None
    return _query_text(next(iter(given.values()))) if len(given) == 1 else given


def _event_values(event: Any) -> dict[str, Any]:
    """The values a workflow event carries: a typed event's fields, then the free-form
    data it was given (None left out)."""
    given: dict[str, Any] = {}
    for name in getattr(type(event), "model_fields", {}):
        value = getattr(event, name, None)
        if value is not None:
            given[name] = value
    data = getattr(event, "_data", None)
    if isinstance(data, Mapping):
        given.update((k, v) for k, v in data.items() if v is not None)
    return given


def answer_of(result: Any) -> Any:
    """What the caller of a workflow gets: its stop event's result (else `result`).

    A typed stop event (a subclass, ``class Answer(StopEvent): answer: str``) is the
    run's result itself, as LlamaIndex's handler gives it: its answer is what it carries,
    its fields (and its `result` if it was given one) as a dict - not its `result`, which
    such an event leaves None, nor its `str`, which is that result's. One that carries
    nothing but its result answers that result."""
    if not is_event(result, "StopEvent"):
        return result
    try:
        if type(result).__name__ == "StopEvent":
            return result.result
        given = _event_values(result)
        if not given:
            return result.result
        if getattr(result, "_result", None) is not None:
            given["result"] = result.result
        return given
    except Exception:  # a stop event whose values cannot be read
        return None


def _stop_result(event: Any) -> Any:
    """A workflow's answer: its stop event's result; an agent's response text."""
    result = answer_of(event)
    if isinstance(getattr(result, "response", None), ChatMessage):  # an AgentOutput
        structured = getattr(result, "structured_response", None)
        if structured:  # (output_cls / structured_output_fn: the answer the caller uses,
            return structured  # as a LangChain agent's structured_response is)
        return _agent_text(result)
    return main_output(result)


def _agent_text(output: Any) -> Any:
    """An agent's answer (an `AgentOutput`): its response text; for a step that only asks
    for tools (a hand-off), the calls, one ``[tool call] name({...})`` line each."""
    text = output.response.content
    if text:
        return text
    calls = [c for c in getattr(output, "tool_calls", None) or ()
             if isinstance(c, ToolSelection)]  # (not the results of earlier calls)
    if not calls:
        return text
    return "\n".join(_call_line(c.tool_name, c.tool_kwargs) for c in calls)


def _call_line(name: Any, arguments: Any) -> str:
    """A tool call as shown: ``[tool call] name({...})`` (arguments given as a JSON
    string, as OpenAI's are, as they were given)."""
    if not isinstance(arguments, str):
        try:
            arguments = json.dumps(arguments, ensure_ascii=False, default=str)
        except (TypeError, ValueError):  # (a circular value)
            arguments = repr(arguments)
    return f"[tool call] {name}({arguments})"


def _field(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, Mapping) else getattr(value, key, None)


def _tool_call_line(call: Any) -> str | None:
    """One entry of a message's ``additional_kwargs["tool_calls"]``, in the shapes model
    integrations put there: OpenAI's (a dict or the SDK's object: ``function`` with
    ``name`` and ``arguments``), Anthropic's tool use (``name``, ``input``), a
    ``ToolSelection``, or ``name`` and ``args``."""
    if isinstance(call, ToolSelection):
        return _call_line(call.tool_name, call.tool_kwargs)
    function = _field(call, "function")
    holder = function if function is not None else call
    name = _field(holder, "name")
    if not isinstance(name, str):
        return None
    for key in ("arguments", "args", "input", "tool_kwargs", "kwargs"):
        arguments = _field(holder, key)
        if arguments is not None:
            return _call_line(name, arguments)
    return _call_line(name, {})


def _tool_calls_text(message: ChatMessage) -> list[str]:
    """The tool calls a model's message asks for, one line each: its ``ToolCallBlock``
    blocks, else its ``additional_kwargs["tool_calls"]``."""
    lines = [_call_line(b.tool_name, b.tool_kwargs) for b in message.blocks
             if isinstance(b, ToolCallBlock)]
    if lines:
        return lines
    calls = message.additional_kwargs.get("tool_calls")
    if not isinstance(calls, list | tuple):
        return []
    try:
        return [line for c in calls if (line := _tool_call_line(c)) is not None]
    except Exception:  # (an object in a shape not read: its call is left out)
        return []


def node_text(node: NodeWithScore) -> str:
    """The text of a retrieved node, without its metadata."""
    return node.node.get_content(metadata_mode=MetadataMode.NONE)


def nodes_view(nodes: list[Any]) -> list[dict[str, Any]]:
    """Retrieved nodes as plain values: id, score and text."""
    view = []
    for n in nodes:
        if isinstance(n, NodeWithScore):
            view.append({"node_id": n.node.node_id, "score": n.score, "text": node_text(n)})
        else:
            view.append({"node_id": None, "score": None, "text": str(n)})
    return view


def llm_text(response: Any) -> Any:
    """The text of an LLM response (completion or chat); a chat answer's tool calls
    follow it, one ``[tool call] name({...})`` line each (a model asking for tools answers
    with no text: its call was recorded as '', what it asked for nowhere)."""
    if isinstance(response, CompletionResponse):
        return response.text
    if isinstance(response, ChatResponse):
        message = response.message
        text = message.content
        calls = _tool_calls_text(message)
        if not calls:
            return text
        return "\n".join([text, *calls] if text else calls)
    return response


def _same(result: Any) -> Any:
    return result


def _none(result: Any) -> Any:
    return None


def _response_text(result: Any) -> Any:
    return result.response


def _nodes_or_list(result: Any) -> Any:
    if result and isinstance(result[0], NodeWithScore):
        return nodes_view(result)
    return result


_STREAMS = (StreamingResponse, AsyncStreamingResponse, StreamingAgentChatResponse)
_OUTPUTS: dict[type, Any] = {
    type(None): _same, str: _same, int: _same, float: _same, bool: _same,
    list: _nodes_or_list,
}
_OUTPUT_KINDS: tuple[tuple[Any, Any], ...] = (
    ((Response, AgentChatResponse, PydanticResponse), _response_text),
    ((CompletionResponse, ChatResponse), llm_text),
    (_STREAMS, _none),
    (list, _nodes_or_list),
)


def _stop_event_output(event: Any) -> Any:
    """A stop event, unless it carries a stream (a span holding it would keep the stream
    alive, and a stream dropped unread would never end its record)."""
    answer = answer_of(event)
    if isinstance(answer, _STREAMS) or hasattr(answer, "__next__") or \
            hasattr(answer, "__anext__"):
        return None
    return event


def span_output(result: Any) -> Any:
    """What a span's output is stored as; None for streams (filled in when they end)."""
    convert = _OUTPUTS.get(type(result))
    if convert is None:
        convert = _same
        for classes, fn in _OUTPUT_KINDS:
            if isinstance(result, classes):
                convert = fn
                break
        else:
            if hasattr(result, "__next__") or hasattr(result, "__anext__"):
                convert = _none  # a token generator: its text arrives with the end event
            elif is_event(result, "StopEvent"):
                convert = _stop_event_output
        if len(_OUTPUTS) < 1_000:
            _OUTPUTS[type(result)] = convert
    return convert(result)


def embedding_view(value: Any) -> Any:
    """Embedding vectors are stored as their shape, not their numbers."""
    if isinstance(value, list) and value:
        if isinstance(value[0], float | int):
            return {"dimensions": len(value)}
        if isinstance(value[0], list):
            return {"vectors": len(value), "dimensions": len(value[0])}
    return value


def main_output(result: Any) -> Any:
    """The answer a user would name: the response text (or the retrieved texts)."""
    if isinstance(result, list) and (not result or isinstance(result[0], NodeWithScore)):
        return [node_text(n) for n in result]
    if is_event(result, "StopEvent"):
        return _stop_result(result)
    if is_event(result, "AgentOutput") and isinstance(getattr(result, "response", None),
                                                        ChatMessage):
        return _agent_text(result)
    if isinstance(result, StreamingResponse | AsyncStreamingResponse):
        return result.response_txt  # a stream that had nothing to stream
    if isinstance(result, StreamingAgentChatResponse):
        return result.response
    return span_output(result)


def token_text(token: Any) -> str:
    """The text of one streamed token: a string, or a model's response (its delta)."""
    if isinstance(token, str):
        return token
    if isinstance(token, CompletionResponse | ChatResponse):
        return token.delta or ""
    return str(token)


def usage_of(response: Any) -> TokenUsage | None:
    """Token usage as the model reported it; None when it reported none (never 0): the
    provider's raw response's ``usage`` (or Gemini's ``usage_metadata``), else the
    response's extra fields (where some integrations put the counts)."""
    raw = getattr(response, "raw", None)
    if isinstance(raw, Mapping):
        usage, metadata = raw.get("usage"), raw.get("usage_metadata")
    else:
        usage = getattr(raw, "usage", None) if raw is not None else None
        metadata = getattr(raw, "usage_metadata", None) if raw is not None else None
    return first_usage(usage, metadata, getattr(response, "additional_kwargs", None))
