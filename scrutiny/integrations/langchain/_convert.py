"""Reading LangChain values: the main input and output of a run, token usage, documents.

These run on the application's thread at the end of a root run, so they only look at the
shape of values (no copying, no serialization).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from scrutiny.core import TokenUsage
from scrutiny.core._usage import read_usage

__all__ = ["asks_for_tools", "content_text", "document_text", "llm_output", "main_input",
           "main_output", "tool_calls_of", "usage_of"]

_INPUT_KEYS = ("question", "input", "query", "prompt", "text", "message", "messages")
# (a LangGraph state: the RAG tutorials' "generation", a chat graph's "messages" — its last
# message is the answer; an extra key beside them left the whole state as the output)
# (an agent of `create_agent(..., response_format=...)`: its "structured_response" is the
# answer; its last message only says "Returning structured response: ...")
_OUTPUT_KEYS = ("answer", "output", "result", "text", "response", "content", "generation",
                "structured_response", "messages")
# with_structured_output(..., include_raw=True)
_WITH_RAW = frozenset(("raw", "parsed", "parsing_error"))
_ROLES = frozenset({"user", "human", "assistant", "ai", "system", "tool", "developer",
                    "function"})


def content_text(message: BaseMessage) -> Any:
    """A message's text (its content blocks' texts joined)."""
    content = message.content
    if isinstance(content, list):  # content blocks
        texts = [b.get("text", "") if isinstance(b, Mapping) else str(b) for b in content]
        return "".join(texts)
    return content


def tool_calls_of(message: Any) -> list[dict[str, Any]]:
    """The tool calls a model's message asks for (malformed ones with their error)."""
    calls: list[dict[str, Any]] = []
    for call in getattr(message, "tool_calls", None) or ():
        calls.append({"name": call.get("name"), "args": call.get("args"),
                      "id": call.get("id")})
    for call in getattr(message, "invalid_tool_calls", None) or ():
        calls.append({"name": call.get("name"), "args": call.get("args"),
                      "id": call.get("id"), "error": call.get("error")})
    return calls


def _rendered(call: Mapping[str, Any]) -> str:
    args = call.get("args")
    shown = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False,
                                                          default=str)
    return f"[tool call] {call.get('name')}({shown})"


def _message_text(message: BaseMessage) -> Any:
    """A message's text; the tool calls it asks for follow, one line each (an agent's
    step that only calls a tool has no text, and its record said nothing at all)."""
    return _with_calls(content_text(message), tool_calls_of(message))


def _with_calls(text: Any, calls: Sequence[Mapping[str, Any]]) -> Any:
    if not calls:
        return text
    lines = "\n".join(_rendered(c) for c in calls)
    return f"{text}\n{lines}" if isinstance(text, str) and text else lines


_MAX_UNWRAP = 64
"""How many levels of wrapping (a dict of one key, a Command) are looked through."""


def _from_mapping(value: Mapping[str, Any], keys: Sequence[str], depth: int) -> Any:
    if len(value) == 2 and "tool_calls" in value and "text" in value:  # see llm_output
        return _with_calls(value["text"], value["tool_calls"])
    if len(value) == 1:
        return _plain(next(iter(value.values())), keys, depth + 1)
    if len(value) == 3 and value.keys() == _WITH_RAW:
        # the parsed object; the model's own text when it could not be parsed
        parsed = value["parsed"]
        return _plain(value["raw"] if parsed is None else parsed, keys, depth + 1)
    for key in keys:
        if key in value:
            return _plain(value[key], keys, depth + 1)
    return value


def _plain(value: Any, keys: Sequence[str], depth: int = 0) -> Any:
    if depth > _MAX_UNWRAP:  # (a structure that holds itself, or one nested that deep)
        return value
    kind = type(value)
    if kind is str or kind is int or kind is float or value is None:
        return value
    if kind is dict:
        return _from_mapping(value, keys, depth)
    if isinstance(value, BaseMessage):
        return _message_text(value)
    if isinstance(value, Mapping):
        return _from_mapping(value, keys, depth)
    if isinstance(value, list) and value and all(isinstance(v, BaseMessage) for v in value):
        return _message_text(value[-1])
    if isinstance(value, list) and value and all(_is_message_like(v) for v in value):
        return _message_like_text(value[-1])  # [("user", "hi")], [{"role": ..., ...}]
    if isinstance(value, LLMResult):
        return llm_output(value)
    if hasattr(value, "to_string") and hasattr(value, "to_messages"):  # a PromptValue
        return value.to_string()
    if _is_command(value):
        return _from_command(value, keys, depth)
    if isinstance(value, list) and value and all(_is_command(v) for v in value):
        # a node's list of Commands (each model step of `create_agent`): the last update
        for command in reversed(value):
            if command.update is not None:
                return _from_command(command, keys, depth)
    return value


def _is_command(value: Any) -> bool:
    """LangGraph's ``Command`` (not imported: LangGraph is optional)."""
    return type(value).__name__ == "Command" and hasattr(value, "resume") and \
        hasattr(value, "update")


def _from_command(command: Any, keys: Sequence[str], depth: int) -> Any:
    """A run resumed after an interrupt: the answer it was resumed with; a node's
    ``Command(update=..., goto=...)`` (a hand-off): the update it made."""
    if command.resume is not None:
        return _plain(command.resume, keys, depth + 1)
    return _plain(command.update, keys, depth + 1)


def _is_message_like(value: Any) -> bool:
    """A message in one of the forms LangChain accepts besides BaseMessage: a
    ``(role, content)`` pair or a ``{"role": ..., "content": ...}`` dict."""
    if isinstance(value, BaseMessage):
        return True
    if isinstance(value, tuple) and len(value) == 2:
        return isinstance(value[0], str) and value[0] in _ROLES
    if isinstance(value, Mapping):
        role = value.get("role", value.get("type"))
        return isinstance(role, str) and role in _ROLES and "content" in value
    return False


def _message_like_text(value: Any) -> Any:
    if isinstance(value, BaseMessage):
        return _message_text(value)
    content = value[1] if isinstance(value, tuple) else value["content"]
    if isinstance(content, list):  # content blocks
        return "".join(b.get("text", "") if isinstance(b, Mapping) else str(b)
                       for b in content)
    return content


def main_input(inputs: Any) -> Any:
    """The question a user would name: a single input value, a message's text, ..."""
    return _plain(inputs, _INPUT_KEYS)


def main_output(outputs: Any) -> Any:
    """The answer a user would name: a string output, a message's text, ..."""
    return _plain(outputs, _OUTPUT_KEYS)


def asks_for_tools(outputs: Any) -> bool:
    """Whether what `main_output` reads in `outputs` is a model's message that asks for
    tools (an agent's state whose last message calls one): no answer yet."""
    try:
        message = _answer_message(outputs, 0)
        return message is not None and bool(tool_calls_of(message))
    except Exception:  # (read on a record's assembly: it must not raise)
        return False


def _answer_message(value: Any, depth: int) -> BaseMessage | None:
    """The message `main_output` reads its text from (as _plain finds it), if any."""
    if depth > _MAX_UNWRAP:
        return None
    if isinstance(value, BaseMessage):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], BaseMessage):
        return value[-1]
    if isinstance(value, Mapping):
        if len(value) == 1:
            return _answer_message(next(iter(value.values())), depth + 1)
        for key in _OUTPUT_KEYS:
            if key in value:
                return _answer_message(value[key], depth + 1)
    return None


def llm_output(response: LLMResult) -> Any:
    """The text of the generation (a list when there are several); a generation that asks
    for tools is ``{"text": ..., "tool_calls": [{"name", "args", "id"}, ...]}``."""
    outputs: list[Any] = []
    for gens in response.generations:
        for g in gens:
            calls = tool_calls_of(g.message) if isinstance(g, ChatGeneration) else []
            outputs.append({"text": g.text, "tool_calls": calls} if calls else g.text)
    if len(outputs) == 1:
        return outputs[0]
    return outputs


def usage_of(response: LLMResult) -> TokenUsage | None:
    """Token usage as the model reported it; None when it reported none (not 0).

    A response's choices (a chat model asked for ``n`` answers) that all carry the same
    usage each carry the whole response's (langchain-openai and OpenAI-compatible models
    put it on every choice): it counts once, as LangChain's UsageMetadataCallbackHandler
    counts it. A completion LLM's batch is one call: its usage is the first prompt's run's
    (LangChain empties ``token_usage`` on the others, see `_later_in_batch`).
    """
    usages: list[TokenUsage | None] = []
    for gens in response.generations:  # (one list of choices per prompt)
        choices: list[TokenUsage] = []
        for g in gens:
            if isinstance(g, ChatGeneration):
                meta = getattr(g.message, "usage_metadata", None)
                if meta:
                    choices.append(TokenUsage(meta.get("input_tokens"),
                                              meta.get("output_tokens"),
                                              meta.get("total_tokens")))
        if choices and all(u == choices[0] for u in choices):
            usages.append(choices[0])  # one response's usage, on each of its choices
        else:
            usages.extend(choices)  # (each choice's own usage)
    total = TokenUsage.total(usages)
    if total is not None:
        return total
    out = response.llm_output or {}
    if _later_in_batch(out):
        return None
    raw = out.get("token_usage") or out.get("usage")
    # (in any provider's spelling: Anthropic's cache reads, Bedrock's camelCase; see
    # scrutiny.core._usage)
    return read_usage(raw) if isinstance(raw, Mapping) else None


def _later_in_batch(llm_output: Mapping[str, Any]) -> bool:
    """Whether this is the run of a batch's second or later prompt: a completion LLM
    answers a batch in one call, and LangChain hands each prompt's run that call's
    ``llm_output``, its ``token_usage`` emptied on all but the first (`LLMResult.flatten`)
    so that it counts once. A ``usage`` key (Anthropic's name) is left as it was: read
    there, each record of a batch had the whole batch's usage."""
    marker = llm_output.get("token_usage", None)
    return isinstance(marker, Mapping) and not marker


def document_text(doc: Any) -> str:
    """The text of a retrieved document."""
    if isinstance(doc, Document):
        return doc.page_content
    return str(getattr(doc, "page_content", doc))
