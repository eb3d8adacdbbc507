"""Presets: the feedbacks most apps want, wired in one call."""

from __future__ import annotations

from typing import Any, NamedTuple

from scrutiny.core import ConfigurationError, Feedback, Select

__all__ = ["RagTriad", "rag_triad"]


class RagTriad(NamedTuple):
    """The three RAG feedbacks; a tuple, so it can be passed as ``feedbacks=`` directly."""

    context_relevance: Feedback
    groundedness: Feedback
    answer_relevance: Feedback


def rag_triad(provider: Any) -> RagTriad:
    """Context relevance, groundedness and answer relevance, wired to a record.

    - context relevance: ``Select.input`` against each of ``Select.contexts`` (the mean);
    - groundedness: the answer (``Select.output``) against all contexts together;
    - answer relevance: ``Select.input`` against ``Select.output``.

    Works with LangChain and LlamaIndex records alike (both fill input, output and the
    retrieved contexts). A record without contexts gets `skipped` context relevance and
    groundedness, with the reason.

    Args:
        provider: an :class:`LLMJudge`, or any object with the same three methods (e.g.
            the offline :class:`Embeddings`).
    """
    missing = [m for m in ("context_relevance", "groundedness", "answer_relevance")
               if not callable(getattr(provider, m, None))]
    if missing:  # (a chat model given as it is: AttributeError 'context_relevance')
        raise ConfigurationError(
            f"rag_triad takes a judge with {', '.join(missing)}, e.g. "
            f"rag_triad(LLMJudge(model)) or rag_triad(Embeddings()); got "
            f"{type(provider).__name__}")
    return RagTriad(
        context_relevance=Feedback(provider.context_relevance).on(
            question=Select.input, context=Select.contexts),
        groundedness=Feedback(provider.groundedness).on(
            contexts=Select.contexts.collect(), answer=Select.output),
        answer_relevance=Feedback(provider.answer_relevance).on(
            question=Select.input, answer=Select.output),
    )
