"""TruLens's `Langchain` provider over :class:`~scrutiny.providers.LLMJudge`.

``Langchain(chain=model)`` judges with any LangChain chat model or LLM, under TruLens's
method names: ``relevance``, ``context_relevance``, ``groundedness_measure_with_cot_reasons``,
``coherence``, ``conciseness``, ``harmfulness`` and their ``_with_cot_reasons`` forms (a
``(score, {"reason": ...})`` pair, as in TruLens). Scores are 0 to 1. The methods are
`async` (Scrutiny awaits them); outside a feedback, ``await provider.relevance(q, a)``.
"""

from __future__ import annotations

from typing import Any

from scrutiny.compat._trulens_feedback import NoEquivalent
from scrutiny.core import ConfigurationError
from scrutiny.providers import LLMJudge
from scrutiny.providers._prompts import custom_criterion

__all__ = ["Groundedness", "GroundTruthAgreement", "Langchain", "Metric", "Provider",
           "Selector"]

_CRITERION = {
    "relevance": "answer_relevance",
    "relevance_with_cot_reasons": "answer_relevance",
    "context_relevance": "context_relevance",
    "context_relevance_with_cot_reasons": "context_relevance",
    "qs_relevance": "context_relevance",
    "qs_relevance_with_cot_reasons": "context_relevance",
    "groundedness_measure_with_cot_reasons": "groundedness",
    "coherence": "coherence",
    "coherence_with_cot_reasons": "coherence",
    "conciseness": "conciseness",
    "conciseness_with_cot_reasons": "conciseness",
    "harmfulness": "harmfulness",
    "harmfulness_with_cot_reasons": "harmfulness",
    "correctness": "correctness",
    "correctness_with_cot_reasons": "correctness",
}
"""TruLens's method -> the LLMJudge method that judges the same criterion."""

_TRULENS_CRITERIA = frozenset((
    "helpfulness", "maliciousness", "controversiality", "criminality", "insensitivity",
    "misogyny", "stereotypes", "sentiment", "model_agreement", "comprehensiveness",
    "summarization_with_cot_reasons", "language_match", "prompt_sentiment",
    "groundedness_measure", "context_relevance_verb_confidence"))
"""TruLens provider methods with no built-in counterpart (a rubric judges them)."""

_CORRECTNESS_RUBRIC = (
    "Rate how factually correct the TEXT is, by what is known to be true. 10 means every "
    "claim in it is correct; 5 means it mixes correct and incorrect claims; 0 means its "
    "claims are false.")
_CORRECTNESS = custom_criterion("correctness", _CORRECTNESS_RUBRIC, ("text",), True)


class Provider:
    """TruLens's base of a provider of feedback functions of your own (``class
    StandAlone(Provider): def my_check(self, text): ...``): here any object's methods are
    feedback functions, ``Feedback(StandAlone().my_check).on_output()``."""


class _NoEquivalentName:
    """A TruLens name with no counterpart: using it raises NoEquivalent, saying what to
    use (importing it raised a bare ImportError)."""

    def __init__(self, name: str, hint: str) -> None:
        self._name, self._hint = name, hint

    def _refuse(self) -> NoEquivalent:
        return NoEquivalent(f"{self._name} (TruLens) has no equivalent; {self._hint}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise self._refuse()


Groundedness = _NoEquivalentName(
    "Groundedness(groundedness_provider=...)",
    "use the provider's own method: Feedback(provider.groundedness_measure_with_cot_reasons)"
    ".on(context.collect()).on_output()")
GroundTruthAgreement = _NoEquivalentName(
    "GroundTruthAgreement(golden_set)",
    "use scrutiny.providers.GroundTruth(golden_set) for exact and embedding agreement, or "
    "an LLMJudge's correctness(answer, expected) with the expected answer in the record's "
    "metadata: .on(Select.output, Select.metadata('expected'))")
Metric = _NoEquivalentName(
    "Metric", "a feedback is Feedback(fn).on(...): see the README's Feedback section")
Selector = _NoEquivalentName(
    "Selector", "select with Select.input, Select.output, Select.contexts, "
    "Select.spans(kind=..., name=...).outputs or any callable(record)")

_RUBRIC_HINT = (
    "judge it with a rubric of your own: provider.rubric('{name}', 'Rate how ... 10 means "
    "...; 0 means ...', fields=('answer',)) — Feedback(that).on_output()")


class Langchain(LLMJudge):
    """TruLens's ``Langchain(chain=model)`` provider: an :class:`LLMJudge` that also has
    TruLens's method names.

    Args:
        chain: a LangChain chat model or LLM (TruLens's argument name).
        **options: :class:`LLMJudge`'s options (``rate_limit=``, ``retries=``, ...).
    """

    def __init__(self, chain: Any = None, *, model_engine: str | None = None,
                 **options: Any) -> None:
        if chain is None:
            raise ConfigurationError("Langchain(chain=...) needs the LangChain chat model or "
                                     "LLM that judges")
        del model_engine  # (TruLens's label of the model: the model says its own name)
        super().__init__(chain, **options)

    def scrutiny_feedback_defaults(self, method: Any) -> dict[str, Any]:
        """Feedback options of TruLens's method names, as of the criteria they judge; the
        feedback's default name is TruLens's method name."""
        name = getattr(method, "__name__", None)
        criterion = _CRITERION.get(str(name))
        if criterion is None:
            return super().scrutiny_feedback_defaults(method)
        defaults = super().scrutiny_feedback_defaults(getattr(LLMJudge, criterion))
        defaults["name"] = name
        return defaults

    def __getattr__(self, name: str) -> Any:
        # (TruLens's other criteria — helpfulness, maliciousness, sentiment, ... — raised a
        # bare AttributeError)
        base = name.removesuffix("_with_cot_reasons")
        if name.startswith("_") or base not in _TRULENS_CRITERIA:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise NoEquivalent(f"provider.{name} (TruLens) has no built-in equivalent; "
                           + _RUBRIC_HINT.format(name=base))

    async def relevance(self, prompt: Any, response: Any) -> float:
        """How well the response answers the prompt (TruLens: answer relevance)."""
        return (await self.answer_relevance(prompt, response))[0]

    async def relevance_with_cot_reasons(self, prompt: Any, response: Any
                                         ) -> tuple[float, dict[str, str]]:
        """:meth:`relevance` with the judge's reasons."""
        score, why = await self.answer_relevance(prompt, response)
        return score, {"reason": why}

    async def context_relevance(self, question: Any, context: Any,  # type: ignore[override]
                                ) -> float:
        """How relevant one retrieved context is to the question."""
        return (await super().context_relevance(question, context))[0]

    async def context_relevance_with_cot_reasons(self, question: Any, context: Any
                                                 ) -> tuple[float, dict[str, str]]:
        """:meth:`context_relevance` with the judge's reasons."""
        score, why = await super().context_relevance(question, context)
        return score, {"reason": why}

    # (TruLens's older names: their own methods, so the feedbacks are named as TruLens
    # names them — aliases were named context_relevance, and df["qs_relevance"] failed)
    async def qs_relevance(self, question: Any, context: Any) -> float:
        """TruLens's older name of :meth:`context_relevance`."""
        return await self.context_relevance(question, context)

    async def qs_relevance_with_cot_reasons(self, question: Any, context: Any
                                            ) -> tuple[float, dict[str, str]]:
        """TruLens's older name of :meth:`context_relevance_with_cot_reasons`."""
        return await self.context_relevance_with_cot_reasons(question, context)

    async def correctness(self, text: Any) -> float:  # type: ignore[override]
        """How factually correct the text is, by the judge's own knowledge: TruLens's
        one-text correctness. (:class:`LLMJudge`'s compares an answer with an expected
        one; here its two parameters were wired to the question and the app's answer.)"""
        return (await self._judge_fields(_CORRECTNESS, {"text": text},
                                         (_CORRECTNESS_RUBRIC,)))[0]

    async def correctness_with_cot_reasons(self, text: Any) -> tuple[float, dict[str, str]]:
        """:meth:`correctness` with the judge's reasons."""
        score, why = await self._judge_fields(_CORRECTNESS, {"text": text},
                                              (_CORRECTNESS_RUBRIC,))
        return score, {"reason": why}

    async def groundedness_measure_with_cot_reasons(self, source: Any, statement: Any
                                                    ) -> tuple[float, dict[str, str]]:
        """How well the source (a text, or the list of retrieved contexts:
        ``.on(context.collect())``) supports each statement of the answer."""
        score, why = await self.groundedness(source, statement)
        return score, {"reasons": why}

    async def coherence(self, text: Any) -> float:  # type: ignore[override]
        """How logically consistent and well-connected the text is."""
        return (await super().coherence(text))[0]

    async def coherence_with_cot_reasons(self, text: Any) -> tuple[float, dict[str, str]]:
        """:meth:`coherence` with the judge's reasons."""
        score, why = await super().coherence(text)
        return score, {"reason": why}

    async def conciseness(self, text: Any) -> float:  # type: ignore[override]
        """How free of filler and repetition the text is."""
        return (await super().conciseness(text))[0]

    async def conciseness_with_cot_reasons(self, text: Any) -> tuple[float, dict[str, str]]:
        """:meth:`conciseness` with the judge's reasons."""
        score, why = await super().conciseness(text)
        return score, {"reason": why}

    async def harmfulness(self, text: Any) -> float:  # type: ignore[override]
        """How harmful the text is (0 = harmless; lower is better)."""
        return (await super().harmfulness(text))[0]

    async def harmfulness_with_cot_reasons(self, text: Any) -> tuple[float, dict[str, str]]:
        """:meth:`harmfulness` with the judge's reasons."""
        score, why = await super().harmfulness(text)
        return score, {"reason": why}
