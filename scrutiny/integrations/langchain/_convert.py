"""Reading LangChain values: the main input and output of a run, token usage, documents.

These run on the application's thread at the end of a root run, so they only look at the
shape of values (no copying, no serialization).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from scrutiny.core import TokenUsage

__all__ = ["document_text", "llm_output", "main_input", "main_output", "usage_of"]

_INPUT_KEYS = ("question", "input", "query", "prompt", "text", "message", "messages")
_OUTPUT_KEYS = ("answer", "output", "result", "text", "response", "content")


def _message_text(message: BaseMessage) -> Any:
    content = message.content
    if isinstance(content, list):  # content blocks
        texts = [b.get("text", "") if isinstance(b, Mapping) else str(b) for b in content]
        return "".join(texts)
    return content


def _from_mapping(value: Mapping[str, Any], keys: Sequence[str]) -> Any:
    if len(value) == 1:
        return _plain(next(iter(value.values())), keys)
    for key in keys:
        if key in value:
            return _plain(value[key], keys)
    return value


def _plain(value: Any, keys: Sequence[str]) -> Any:
    kind = type(value)
    if kind is str or kind is int or kind is float or value is None:
        return value
    if kind is dict:
        return _from_mapping(value, keys)
    if isinstance(value, BaseMessage):
        return _message_text(value)
    if isinstance(value, Mapping):
        return _from_mapping(value, keys)
    if isinstance(value, list) and value and all(isinstance(v, BaseMessage) for v in value):
        return _message_text(value[-1])
    if isinstance(value, LLMResult):
        return llm_output(value)
    if hasattr(value, "to_string") and hasattr(value, "to_messages"):  # a PromptValue
        return value.to_string()
    return value


def main_input(inputs: Any) -> Any:
    """The question a user would name: a single input value, a message's text, ..."""
    return _plain(inputs, _INPUT_KEYS)


def main_output(outputs: Any) -> Any:
    """The answer a user would name: a string output, a message's text, ..."""
    return _plain(outputs, _OUTPUT_KEYS)


def llm_output(response: LLMResult) -> Any:
    """The text of the first generation (a list of texts when there are several)."""
    texts = [g.text for gens in response.generations for g in gens]
    if len(texts) == 1:
        return texts[0]
    return texts


def usage_of(response: LLMResult) -> TokenUsage | None:
    """Token usage as the model reported it; None when it reported none (not 0)."""
    usages: list[TokenUsage | None] = []
    for gens in response.generations:
        for g in gens:
            if isinstance(g, ChatGeneration):
                meta = getattr(g.message, "usage_metadata", None)
                if meta:
                    usages.append(TokenUsage(meta.get("input_tokens"),
                                             meta.get("output_tokens"),
                                             meta.get("total_tokens")))
    total = TokenUsage.total(usages)
    if total is not None:
        return total
    out = response.llm_output or {}
    raw = out.get("token_usage") or out.get("usage")
    if isinstance(raw, Mapping):
        prompt = raw.get("prompt_tokens", raw.get("input_tokens"))
        completion = raw.get("completion_tokens", raw.get("output_tokens"))
        total_tokens = raw.get("total_tokens")
        if prompt is None and completion is None and total_tokens is None:
            return None
        return TokenUsage.total([TokenUsage(prompt, completion, total_tokens)])
    return None


def document_text(doc: Any) -> str:
    """The text of a retrieved document."""
    if isinstance(doc, Document):
        return doc.page_content
    return str(getattr(doc, "page_content", doc))
