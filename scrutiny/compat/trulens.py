"""TruLens names over Scrutiny: TruLens code runs here with its imports changed.

    from scrutiny.compat.trulens import (Feedback, FeedbackMode, Select, TruBasicApp,
                                         TruChain, TruLlama, TruSession, run_dashboard)

What works as in TruLens:

* ``TruSession(database_url=..., database_prefix=...)`` (also ``Tru``):
  ``reset_database()``, ``migrate_database()``, ``get_records_and_feedback(app_ids=,
  app_name=, app_version=, app_versions=, record_ids=, offset=, limit=)``,
  ``get_leaderboard(app_ids=, format=)``, ``wait_for_feedback_results(record_ids,
  feedback_names, timeout)``, ``start_evaluator()`` / ``stop_evaluator()`` (deferred
  mode), ``run_dashboard()`` / ``stop_dashboard()``, ``delete_app()``, ``get_app(s)()``,
  ``force_flush()``.
* ``Feedback(fn, agg=..., name=..., higher_is_better=...)`` with ``.on_input_output()``,
  ``.on_input()`` / ``.on_prompt()``, ``.on_output()`` / ``.on_response()``,
  ``.on_default()``, ``.on_context(collect_list=)``, ``.on(...)``, ``.aggregate(...)``;
  ``Select.RecordInput``, ``Select.RecordOutput``, ``Select.context(app)``.
* ``TruChain(chain, ...)``, ``TruLlama(engine, ...)`` and ``TruBasicApp(fn, ...)`` with
  ``app_name=``, ``app_version=`` (default ``"base"``), ``app_id=``, ``feedbacks=``,
  ``feedback_mode=``, ``tags=``, ``metadata=``: ``with tru as recording:``,
  ``recording.get()`` / ``.records`` / ``[i]``, ``tru.with_record(...)`` /
  ``awith_record(...)``, ``tru.app_id``; ``TruChain.select_context(app)``,
  ``TruLlama.select_context(app)`` and ``TruLlama.select_source_nodes().node.text`` (the
  retrieved texts).
* Records also answer to ``record.main_input``, ``main_output``, ``main_error``, ``meta``
  and ``wait_for_feedback_results(feedback_timeout=)``.
* TruLens's LangChain provider, ``Langchain(chain=model)``: ``relevance``,
  ``context_relevance`` (and ``qs_relevance``), ``groundedness_measure_with_cot_reasons``,
  ``coherence``, ``conciseness``, ``harmfulness``, ``correctness`` and their
  ``_with_cot_reasons`` forms (async methods); ``Provider`` as the base of a provider of
  your own; ``Feedback.on({"param": selector})``.

What has no equivalent raises :class:`NoEquivalent` (a ``ConfigurationError``) saying
what to use: lenses into call paths (``Select.RecordCalls...``: use ``Select.spans(...)``,
``Select.contexts`` or a ``callable(record)``), ``TruApp`` / ``TruCustomApp`` /
``@instrument``, ``TruVirtual`` (and ``VirtualApp``, ``VirtualRecord``), and TruLens's
other providers (``OpenAI()`` & co.: use ``Langchain(chain=ChatOpenAI(...))``).
"""

from __future__ import annotations

from scrutiny.compat._trulens_apps import (
    AzureOpenAI,
    Bedrock,
    Huggingface,
    LiteLLM,
    OpenAI,
    TruApp,
    TruBasicApp,
    TruChain,
    TruCustomApp,
    TruLlama,
    TruRecord,
    TruVirtual,
    VirtualApp,
    VirtualRecord,
    instrument,
)
from scrutiny.compat._trulens_feedback import Feedback, NoEquivalent, Select
from scrutiny.compat._trulens_providers import (
    Groundedness,
    GroundTruthAgreement,
    Langchain,
    Metric,
    Provider,
    Selector,
)
from scrutiny.compat._trulens_session import TruSession, run_dashboard, stop_dashboard
from scrutiny.core import FeedbackMode

Tru = TruSession
"""TruLens's older name of the session."""

__all__ = [
    "AzureOpenAI",
    "Bedrock",
    "Feedback",
    "FeedbackMode",
    "GroundTruthAgreement",
    "Groundedness",
    "Huggingface",
    "Langchain",
    "LiteLLM",
    "Metric",
    "NoEquivalent",
    "OpenAI",
    "Provider",
    "Select",
    "Selector",
    "Tru",
    "TruApp",
    "TruBasicApp",
    "TruChain",
    "TruCustomApp",
    "TruLlama",
    "TruRecord",
    "TruSession",
    "TruVirtual",
    "VirtualApp",
    "VirtualRecord",
    "instrument",
    "run_dashboard",
    "stop_dashboard",
]
