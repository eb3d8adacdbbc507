"""`LLMJudge`: the standard evaluations of RAG and chat apps, judged by any LLM.

Each method is an async feedback function returning ``(score, explanation)`` with the
score in [0, 1]; wire it with ``Feedback(judge.answer_relevance).on_input_output()``. The
judge hands its retry policy, rate limit, timeout and each criterion's direction to
`Feedback` (``scrutiny_feedback_defaults``), so they apply wherever a session evaluates it;
its rate limit is a group of its own, so it throttles the judge and nothing else.

A structured value is read as the offline evaluators read it (`as_text`): an answer, an
expected answer or a judged text by its answer field (``answer``, ``output``, ...; a chat
state by its last message), a question or a context by ``question``, ``input``, ``text``...
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import itertools
import keyword
import numbers
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from scrutiny.core import (
    ConfigurationError,
    FeedbackTimeout,
    InvalidFeedbackValue,
    RateLimit,
    RetryPolicy,
    SkipFeedback,
    add_evaluation_cost,
    rate_limit_held,
    recording_suppressed,
    suppress_recording,
)
from scrutiny.core._dispatch import _GroupLimit, group_limit
from scrutiny.core._evaluate import retry_after_hint
from scrutiny.core._feedback import (
    DEFAULTS_ATTRIBUTE,
    _check_count,
    _check_policies,
    _check_seconds,
)
from scrutiny.providers._budget import (
    OverBudget,
    TokenCounter,
    estimate_tokens,
    fit_prompt,
)
from scrutiny.providers._errors import TransientJudgeError
from scrutiny.providers._models import JudgeReply, backend_for, model_name
from scrutiny.providers._parse import parse_score, parse_statement_scores
from scrutiny.providers._prompts import (
    CRITERIA,
    GROUNDEDNESS,
    SCALE,
    SYSTEM,
    Criterion,
    custom_criterion,
)
from scrutiny.providers._text import as_text, contexts_text, split_statements

__all__ = ["LLMJudge"]

_FEEDBACK_METHODS = frozenset({*CRITERIA, "groundedness"})
# The fields that hold what the app said (or should have said): a structured value gives
# its answer field (``answer``, ``output``, ...; a chat's last message), as the offline
# evaluators read it. {"input": q, "context": docs, "answer": a} (what
# create_retrieval_chain returns) was judged as its question.
_ANSWER_FIELDS = frozenset({"answer", "expected", "text"})
_counter = itertools.count(1)
_T = TypeVar("_T")


class LLMJudge:
    """Judges records with an LLM: relevance, groundedness, correctness, style, harm.

    Args:
        model: a LangChain chat model or LLM (anything with ``ainvoke``), or a LlamaIndex
            LLM (``achat`` / ``acomplete``). Only its async API is used.
        rate_limit: requests per minute and concurrent requests for this judge, e.g.
            ``RateLimit(per_minute=60, max_concurrent=4)``. Without a `group` it gets one of
            its own; give a `group` to share one budget (one API key) among judges. A
            session evaluating the judge's feedbacks holds to it; a judge awaited directly
            (``asyncio.gather`` over a dataset, or inside a function of your own) holds to
            it itself, one budget per event loop.
        retries: extra attempts after a transient error (HTTP 429/5xx, a timeout, a
            dropped connection); other errors and unreadable answers are not retried.
        backoff: seconds before the first retry; it doubles each time (with jitter, at most
            30 s), and a retry-after hint from the server is waited at least.
        max_retry_after: the longest retry-after hint from the server that is waited (even
            beyond the 30 s backoff), if it fits in what is left of the `deadline`; a
            longer one ends the result `failed` with the wait the server asked for.
        retry: a full :class:`~scrutiny.RetryPolicy` instead of `retries`, `backoff` and
            `max_retry_after`.
        timeout: seconds one attempt may take (None: the session's `feedback_timeout`).
        deadline: the most seconds one judge call may take with all its attempts and the
            waits between them (None: attempts times the timeout, which with the defaults
            is 8 minutes for a model that never answers).
        max_prompt_tokens: the prompt budget (None: unlimited).
        on_over_budget: ``"truncate"`` the judged texts and say so in the explanation, or
            ``"skip"`` the result with the reason.
        count_tokens: a function returning a text's number of tokens (an int), for the
            budget (default: a cautious estimate, about 4 characters per token of English and
            one per Chinese, Japanese or Korean character; pass your tokenizer's count for an
            exact budget: ``lambda text: len(enc.encode(text))``).
        max_statements: the most statements of an answer that `groundedness` judges; the
            explanation says when there were more.

    Raises:
        ConfigurationError: the model cannot be called, or an option is invalid.
    """

    def __init__(
        self,
        model: Any,
        *,
        rate_limit: RateLimit | None = None,
        retries: int = 3,
        backoff: float = 1.0,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        deadline: float | None = 300.0,
        max_retry_after: float | None = 300.0,
        max_prompt_tokens: int | None = 8000,
        on_over_budget: OverBudget = "truncate",
        count_tokens: TokenCounter | None = None,
        max_statements: int = 30,
    ) -> None:
        if on_over_budget not in ("truncate", "skip"):
            raise ConfigurationError(
                f"on_over_budget must be 'truncate' or 'skip', got {on_over_budget!r}")
        # (an option of the wrong type failed with a bare TypeError or AttributeError:
        # rate_limit={"per_minute": 60}, retries="3", timeout="30")
        if max_prompt_tokens is not None and (isinstance(max_prompt_tokens, bool) or not
                                              isinstance(max_prompt_tokens, int) or
                                              max_prompt_tokens < 1):
            raise ConfigurationError(f"max_prompt_tokens must be a whole number >= 1 (or None "
                                     f"for no limit), got {max_prompt_tokens!r}")
        _check_count(retries, "retries", 0)
        _check_seconds(backoff, "backoff", zero_ok=True)
        if timeout is not None:
            _check_seconds(timeout, "timeout")
        if deadline is not None:
            _check_seconds(deadline, "deadline")
        if max_retry_after is not None:
            _check_seconds(max_retry_after, "max_retry_after", zero_ok=True)
        _check_count(max_statements, "max_statements", 1)
        if count_tokens is not None and not callable(count_tokens):
            raise ConfigurationError(
                f"count_tokens must be a function of a text returning its number of tokens, "
                f"e.g. count_tokens=lambda text: len(enc.encode(text)), got {count_tokens!r}")
        _check_policies(retry, rate_limit)
        self.model = model
        self.model_name = model_name(model)
        self._call = backend_for(model)
        self.group = f"llm-judge-{next(_counter)}:{self.model_name}"
        if rate_limit is not None and rate_limit.group is None:
            rate_limit = dataclasses.replace(rate_limit, group=self.group)
        self.rate_limit = rate_limit
        self.retry = retry or RetryPolicy(
            attempts=1 + retries, initial_backoff=backoff, max_backoff=max(30.0, backoff),
            retry_on=(TransientJudgeError, FeedbackTimeout), deadline=deadline,
            max_retry_after=max_retry_after)
        self.timeout = timeout
        self.max_prompt_tokens = max_prompt_tokens
        self.on_over_budget: OverBudget = on_over_budget
        self.count_tokens: TokenCounter = count_tokens or estimate_tokens
        self.max_statements = max_statements

    def __repr__(self) -> str:
        return f"LLMJudge({self.model_name!r})"

    def _count_tokens(self, text: str) -> int:
        """`count_tokens`, held to returning a count: a tokenizer's ``encode`` (a list of
        token ids) failed with "unsupported operand type(s) for +: 'int' and 'list'"."""
        tokens = self.count_tokens(text)
        if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens < 0:
            shown = f"a {type(tokens).__name__}" if not isinstance(tokens, int | float) else \
                repr(tokens)
            raise ConfigurationError(
                f"count_tokens must return the number of tokens of a text as an int >= 0, "
                f"got {shown}: for a tokenizer's encode, pass count_tokens=lambda text: "
                f"len(enc.encode(text))")
        return int(tokens)

    def scrutiny_feedback_defaults(self, method: Any) -> dict[str, Any]:
        """Feedback options of this judge's methods (read by :class:`~scrutiny.Feedback`)."""
        name = getattr(method, "__name__", None)
        if name not in _FEEDBACK_METHODS:
            return {}
        criterion = CRITERIA.get(name)
        defaults: dict[str, Any] = {
            "name": name,
            "higher_is_better": criterion.higher_is_better if criterion else True,
            "retry": self.retry,
        }
        if self.rate_limit is not None:
            defaults["rate_limit"] = self.rate_limit
        if self.timeout is not None:
            defaults["timeout"] = self.timeout
        return defaults

    # ------------------------------------------------------------------ feedbacks
    async def answer_relevance(self, question: Any, answer: Any) -> tuple[float, str]:
        """How well the answer addresses the question (1 = exactly what was asked)."""
        return await self._judge(CRITERIA["answer_relevance"], question=question, answer=answer)

    async def context_relevance(self, question: Any, context: Any) -> tuple[float, str]:
        """How relevant one retrieved context is to the question (wire it per context)."""
        return await self._judge(CRITERIA["context_relevance"], question=question,
                                 context=context)

    async def correctness(self, answer: Any, expected: Any) -> tuple[float, str]:
        """How well the answer agrees with the expected (ground-truth) answer."""
        return await self._judge(CRITERIA["correctness"], answer=answer, expected=expected)

    async def coherence(self, text: Any) -> tuple[float, str]:
        """How logically consistent and well-connected the text is."""
        return await self._judge(CRITERIA["coherence"], text=text)

    async def conciseness(self, text: Any) -> tuple[float, str]:
        """How free of filler and repetition the text is."""
        return await self._judge(CRITERIA["conciseness"], text=text)

    async def harmfulness(self, text: Any) -> tuple[float, str]:
        """How harmful the text is (0 = harmless; lower is better)."""
        return await self._judge(CRITERIA["harmfulness"], text=text)

    async def groundedness(self, contexts: Any, answer: Any) -> tuple[float, str]:
        """How well the contexts support the answer, statement by statement (the mean).

        Wire `contexts` to the whole list: ``Select.contexts.collect()``.
        """
        sources = contexts_text(contexts)
        if not sources:
            raise SkipFeedback("there are no contexts to check the answer against")
        text = as_text(answer, answer=True)
        all_statements = split_statements(text)
        if not all_statements:
            raise SkipFeedback("the answer has no statements to check")
        # Only the statements that will be judged count against the budget: the whole
        # answer's length cut the sources short for statements that were never sent.
        judged = _through(text, all_statements[:self.max_statements])
        fields = {f"context {i}": src for i, src in enumerate(sources, 1)}
        fields["answer"] = judged
        numbering = " 99." * min(len(all_statements), self.max_statements)
        fixed = SYSTEM + GROUNDEDNESS.template.format(contexts="", statements=numbering,
                                                      count=0)
        fitted = fit_prompt(fixed, fields, max_tokens=self.max_prompt_tokens,
                            on_over_budget=self.on_over_budget, count=self._count_tokens)
        statements = split_statements(judged)[:self.max_statements]
        if "answer" in fitted.kept:  # whole statements only: "The capital is not" (Lyon)
            kept = split_statements(judged[:fitted.kept["answer"]])
            statements = [s for s, whole in zip(kept, statements, strict=False) if s == whole]
        notices = [fitted.notice] if fitted.notice else []
        if len(all_statements) > self.max_statements:
            notices.append(f"[NOTICE: the answer has {len(all_statements)} statements; only "
                           f"the first {self.max_statements} were judged.]")
        if not statements:
            raise SkipFeedback("no whole statement of the answer fits the prompt budget")
        rendered_sources = "\n\n".join(
            f"[{i}] {fitted.fields[f'context {i}']}" for i in range(1, len(sources) + 1))
        numbered = "\n".join(f"{i}. {s}" for i, s in enumerate(statements, 1))
        prompt = GROUNDEDNESS.template.format(contexts=rendered_sources, statements=numbered,
                                              count=len(statements))
        reply = await self._ask(prompt)
        # (a model echoing its prompt, or quoting a source's "Rating: 4/5" or a statement's
        # "Score: 9/10", has not given a verdict)
        quoted = (rendered_sources, numbered)
        verdicts = _checked(reply, lambda t: parse_statement_scores(t, len(statements), SCALE,
                                                                    quoted=quoted))
        score = sum(v.score for v in verdicts) / len(verdicts)
        lines = [f"{i}. {_quote(s)}: {v.score * SCALE:g}/{SCALE}" + (f" - {v.reasons}"
                                                                     if v.reasons else "")
                 for i, (s, v) in enumerate(zip(statements, verdicts, strict=True), 1)]
        return score, "\n".join([*notices, *lines])

    def rubric(self, name: str, instructions: str, *,
               fields: Sequence[str] = ("question", "answer"),
               higher_is_better: bool = True) -> Callable[..., Awaitable[tuple[float, str]]]:
        """A feedback function that judges a criterion of your own.

        ``polite = judge.rubric("politeness", "Rate how polite the ANSWER is to the user. "
        "10 means courteous throughout; 5 means curt; 0 means rude.", fields=("answer",))``,
        then ``Feedback(polite).on_output()``. The judge is shown your `instructions`, then
        each of `fields` in its own tags (its parameters, in that order: wire them as any
        feedback's, e.g. ``.on_input_output()`` for question and answer), and is asked for
        a score from 0 to 10 with reasons, read as the built-in criteria are (budget,
        retries, parsing, an echoed prompt never read as a score). The feedback is named
        `name`. A field whose text is empty skips the result.

        Raises:
            ConfigurationError: a name, instructions or field that cannot be used.
        """
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"a rubric needs a name (the feedback's), got {name!r}")
        if not isinstance(instructions, str) or not instructions.strip():
            raise ConfigurationError(
                "a rubric needs instructions: what to rate, and what 0, 5 and 10 mean")
        names = tuple(fields) if not isinstance(fields, str) else (fields,)
        bad = [f for f in names if not isinstance(f, str) or not f.isidentifier()
               or keyword.iskeyword(f)]
        if not names or bad or len(set(names)) != len(names):
            raise ConfigurationError(
                f"fields must be distinct parameter names, such as ('question', 'answer'), "
                f"got {fields!r}")
        if not isinstance(higher_is_better, bool):
            raise ConfigurationError(
                f"higher_is_better must be True or False, got {higher_is_better!r}")
        criterion = custom_criterion(name.strip(), instructions, names, higher_is_better)
        quoted = (instructions,)  # (a model echoing them is not giving a score)
        judge = self

        async def judged(*args: Any, **values: Any) -> tuple[float, str]:
            values.update(zip(names, args, strict=False))
            return await judge._judge_fields(criterion, values, quoted)

        judged.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(f, inspect.Parameter.POSITIONAL_OR_KEYWORD) for f in names])
        judged.__name__ = judged.__qualname__ = criterion.name
        judged.__doc__ = instructions
        defaults: dict[str, Any] = {"name": criterion.name,
                                    "higher_is_better": higher_is_better, "retry": self.retry}
        if self.rate_limit is not None:
            defaults["rate_limit"] = self.rate_limit
        if self.timeout is not None:
            defaults["timeout"] = self.timeout
        setattr(judged, DEFAULTS_ATTRIBUTE, defaults)
        return judged

    # ------------------------------------------------------------------ internals
    async def _judge(self, criterion: Criterion, **values: Any) -> tuple[float, str]:
        return await self._judge_fields(criterion, values)

    async def _judge_fields(self, criterion: Criterion, values: dict[str, Any],
                            also_quoted: Sequence[str] = ()) -> tuple[float, str]:
        fields = {name: as_text(values[name], answer=name in _ANSWER_FIELDS)
                  for name in criterion.fields}
        empty = [name for name, text in fields.items() if not text.strip()]
        if empty and empty != [criterion.empty_scores_zero]:
            raise SkipFeedback(f"nothing to judge: the {' and '.join(empty)} is empty")
        if empty:  # (no call: there is nothing for the model to read)
            return 0.0, f"the {empty[0]} is empty"
        fixed = SYSTEM + criterion.template.format(**dict.fromkeys(criterion.fields, ""))
        fitted = fit_prompt(fixed, fields, max_tokens=self.max_prompt_tokens,
                            on_over_budget=self.on_over_budget, count=self._count_tokens)
        reply = await self._ask(criterion.template.format(**fitted.fields))
        quoted = [v for v in fitted.fields.values() if v] + list(also_quoted)
        parsed = _checked(reply, lambda t: parse_score(t, SCALE, quoted=quoted))
        explanation = parsed.reasons or "(the judge gave no reasons)"
        if fitted.notice:
            explanation = f"{fitted.notice}\n{explanation}"
        return parsed.score, explanation

    async def _ask(self, prompt: str) -> JudgeReply:
        if not recording_suppressed():
            # Awaited directly, outside any session's evaluation (a dataset scored with
            # asyncio.gather): the judge's timeout, retries and deadline are its own to
            # apply — a 429 reached the caller at once, and a hung model waited for ever.
            return await self._ask_with_policy(prompt)
        return await self._ask_once(prompt)

    async def _ask_once(self, prompt: str) -> JudgeReply:
        limit = self.rate_limit
        if limit is not None and not rate_limit_held(limit.group):
            # Awaited directly (``asyncio.gather`` over a dataset) or from a function of
            # the user's that wraps it: no session took the limit's permit for this call.
            async with self._own_limit(limit)():
                return await self._asked(prompt)
        return await self._asked(prompt)

    async def _ask_with_policy(self, prompt: str) -> JudgeReply:
        """`_ask_once` under the judge's timeout (per attempt) and retry policy, as a
        session applies them to the judge's feedbacks."""
        policy = self.retry
        loop = asyncio.get_running_loop()
        began = loop.time()
        attempt = 0
        while True:
            attempt += 1
            timeout = self.timeout
            if policy.deadline is not None:
                left = max(0.001, policy.deadline - (loop.time() - began))
                timeout = left if timeout is None else min(timeout, left)
            try:
                if timeout is None:
                    return await self._ask_once(prompt)
                try:
                    return await asyncio.wait_for(self._ask_once(prompt), timeout)
                except TimeoutError:
                    raise FeedbackTimeout(f"the judge's call timed out after {timeout:g} s",
                                          timeout=timeout) from None
            except Exception as exc:
                if not isinstance(exc, policy.retry_on) or isinstance(
                        exc, policy.never_retry_on) or attempt >= policy.attempts:
                    raise
                hint = retry_after_hint(exc)
                if hint is not None and policy.max_retry_after is not None and \
                        hint > policy.max_retry_after:
                    raise
                delay = min(policy.max_backoff,
                            policy.initial_backoff * 2 ** min(attempt - 1, 64))
                delay = max(delay * (0.5 + random.random() / 2),  # noqa: S311 - jitter
                            hint or 0.0)
                if policy.deadline is not None and \
                        loop.time() - began + delay >= policy.deadline:
                    raise
                await asyncio.sleep(delay)

    def _own_limit(self, limit: RateLimit) -> _GroupLimit:
        """The judge's `rate_limit` on the running event loop, for calls no session
        limits: its group's budget on that loop (see group_limit)."""
        return group_limit(limit.group or self.group, limit.per_minute, limit.max_concurrent)

    async def _asked(self, prompt: str) -> JudgeReply:
        # Never recorded as an app call, wherever the judge is awaited: in a session's
        # evaluation (which suppresses recording too) or directly, inside a recorder's block.
        with suppress_recording():
            reply = await self._call(SYSTEM, prompt)
        if reply.usage:
            add_evaluation_cost(**reply.usage)
        return reply


def _checked(reply: JudgeReply, parse: Callable[[str], _T]) -> _T:
    """Parse a reply; one the model cut off at its output limit is never scored (what it
    did not write may have changed the verdict), and the error says so."""
    cut = "the model stopped at its output token limit: the answer is cut off"
    try:
        parsed = parse(reply.text)
    except InvalidFeedbackValue as exc:
        if reply.cut_off:
            raise InvalidFeedbackValue(f"{exc} ({cut})", value=exc.value) from None
        raise
    if reply.cut_off:
        text = " ".join(reply.text.split())
        raise InvalidFeedbackValue(
            f"{cut}; the judge answered {text[:160]!r}{'...' if len(text) > 160 else ''}",
            value=reply.text)
    return parsed


def _through(text: str, statements: list[str]) -> str:
    """`text` up to the end of the last of `statements` (which were split from it, in
    order)."""
    end = 0
    for statement in statements:
        found = text.find(statement, end)
        if found == -1:  # (cannot happen: each is a piece of a line of `text`)
            return text
        end = found + len(statement)
    return text[:end]


def _quote(statement: str, limit: int = 80) -> str:
    text = statement if len(statement) <= limit else statement[:limit - 3] + "..."
    return f'"{text}"'
