"""Lexical feedbacks: exact match, token F1, BLEU, ROUGE, regex, contains, length bounds.

Stateless metrics are plain functions of ``(answer, expected)`` (use them with
:class:`GroundTruth` or wire `expected` yourself); configured checks are small callable
classes. All return ``(score, explanation)`` with the score in [0, 1]. Only ROUGE needs an
extra (``pip install 'scrutiny[lexical]'`` for rouge-score); nothing downloads anything.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from scrutiny.core import ConfigurationError
from scrutiny.providers._errors import missing_extra
from scrutiny.providers._text import _UNSPACED, as_text, normalize_answer, words

__all__ = ["Contains", "LengthBounds", "Regex", "Rouge", "bleu", "exact_match", "sentence_bleu",
           "token_f1"]



def exact_match(answer: Any, expected: Any) -> tuple[float, str]:
    """1 when the answers are equal after normalization (case, punctuation, articles)."""
    same = normalize_answer(as_text(answer, answer=True)) == normalize_answer(
        as_text(expected, answer=True))
    return (1.0, "matches the expected answer") if same else (
        0.0, "differs from the expected answer")


def token_f1(answer: Any, expected: Any) -> tuple[float, str]:
    """The F1 of the normalized words of answer and expected answer (SQuAD's metric)."""
    got = words(normalize_answer(as_text(answer, answer=True)))
    want = words(normalize_answer(as_text(expected, answer=True)))
    if not got or not want:
        score = float(got == want)
        return score, "both empty" if score else "one of the answers is empty"
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0, "no word in common with the expected answer"
    precision, recall = common / len(got), common / len(want)
    f1 = 2 * precision * recall / (precision + recall)
    return f1, f"token F1 {f1:.3f} (precision {precision:.3f}, recall {recall:.3f})"


def _tokens(text: str) -> list[str]:
    # Words only, as the other lexical metrics read the text: with each punctuation mark a
    # token (BLEU's 13a tokenizer), '“Paris”' scored 0.23 against 'Paris'.
    return words(unicodedata.normalize("NFKC", text).lower())


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(hypothesis: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Sentence BLEU with uniform weights, brevity penalty and exponential smoothing.

    Papineni et al. (2002) clipped n-gram precisions; a precision with no match is
    replaced by ``1 / (2**k * total)`` for the k-th such order (Chen & Cherry 2014,
    method 3 — NLTK's ``SmoothingFunction().method3``). No unigram match gives 0.
    """
    if not hypothesis or not references:
        return 0.0
    if any(list(hypothesis) == list(ref) for ref in references):
        # An exact answer shorter than max_n words has no n-grams of the longer orders,
        # which the smoothing counts as misses: an exact '42' scored 0.35.
        return 1.0
    log_sum = 0.0
    k = 0
    for n in range(1, max_n + 1):
        counts = _ngrams(hypothesis, n)
        max_ref: Counter[tuple[str, ...]] = Counter()
        for ref in references:
            max_ref |= _ngrams(ref, n)
        matches = sum(min(c, max_ref[g]) for g, c in counts.items())
        total = max(1, sum(counts.values()))
        if matches == 0:
            if n == 1:
                return 0.0
            k += 1
            precision = 1.0 / (2 ** k * total)
        else:
            precision = matches / total
        log_sum += math.log(precision) / max_n
    hyp_len = len(hypothesis)
    ref_len = min((abs(len(r) - hyp_len), len(r)) for r in references)[1]
    penalty = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return penalty * math.exp(log_sum)


def bleu(answer: Any, expected: Any) -> tuple[float, str]:
    """Smoothed sentence BLEU-4 of the answer's words against the expected answer's
    (lower-cased, without punctuation)."""
    got = _tokens(as_text(answer, answer=True))
    want = _tokens(as_text(expected, answer=True))
    if not got and not want:  # (as exact_match and token_f1 have it)
        return 1.0, "both empty"
    score = sentence_bleu(got, [want])
    return score, f"sentence BLEU-4 {score:.3f}"


class _Named:
    """A named evaluator: `Feedback(evaluator)` takes its name as the feedback's name."""

    __slots__ = ()
    name: str

    @property
    def __scrutiny_feedback__(self) -> dict[str, Any]:
        return {"name": self.name}


class Rouge:
    """ROUGE of the answer against the expected answer, via rouge-score.

    Args:
        variant: ``"rouge1"``, ``"rouge2"``, ``"rougeL"`` or ``"rougeLsum"``.
        measure: ``"fmeasure"``, ``"precision"`` or ``"recall"``.
        stemmer: apply the Porter stemmer (no download needed).

    Raises:
        ModuleNotFoundError: rouge-score is missing (``pip install 'scrutiny[lexical]'``).
    """

    __slots__ = ("_lock", "_scorer", "_tokenizer", "measure", "stemmer", "variant")

    def __init__(self, variant: str = "rougeL", *,
                 measure: Literal["fmeasure", "precision", "recall"] = "fmeasure",
                 stemmer: bool = True) -> None:
        if not re.fullmatch(r"rouge(?:[1-9]|L|Lsum)", variant):
            raise ConfigurationError(f"unknown ROUGE variant {variant!r}")
        if measure not in ("fmeasure", "precision", "recall"):
            raise ConfigurationError(f"unknown ROUGE measure {measure!r}")
        if importlib.util.find_spec("rouge_score") is None:
            raise missing_extra("scrutiny.providers.Rouge", "lexical", "rouge-score")
        self.variant = variant
        self.measure = measure
        self.stemmer = stemmer
        self._scorer: Any = None
        self._tokenizer: _WordTokenizer | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # (it goes to other processes with its feedback: a process pool, Dask workers; its
        # lock stays here, and its scorer is built again there on first use)
        return {"variant": self.variant, "measure": self.measure, "stemmer": self.stemmer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.variant = state["variant"]
        self.measure = state["measure"]
        self.stemmer = state["stemmer"]
        self._scorer = None
        self._tokenizer = None
        self._lock = threading.Lock()

    @property
    def __scrutiny_feedback__(self) -> dict[str, Any]:
        return {"name": self.variant.replace("rouge", "rouge_").lower()}

    def __call__(self, answer: Any, expected: Any) -> tuple[float, str]:
        with self._lock:
            if self._scorer is None:
                from rouge_score import rouge_scorer

                self._tokenizer = _WordTokenizer(self.stemmer)
                self._scorer = rouge_scorer.RougeScorer([self.variant],
                                                        tokenizer=self._tokenizer)
        answer_text = as_text(answer, answer=True)
        expected_text = as_text(expected, answer=True)
        if not words(answer_text) and not words(expected_text):  # (as exact_match has it)
            return 1.0, "both empty"
        if self.variant == "rougeL" and self._tokenizer is not None:
            result = _rouge_l(self._tokenizer.tokenize(expected_text),
                              self._tokenizer.tokenize(answer_text))
        else:
            result = self._scorer.score(expected_text, answer_text)[self.variant]
        score = float(getattr(result, self.measure))
        return score, (f"{self.variant} {self.measure} {score:.3f} (precision "
                       f"{result.precision:.3f}, recall {result.recall:.3f})")


def _rouge_l(target: list[str], prediction: list[str]) -> Any:
    """rouge-score's ROUGE-L (the same Score), its longest common subsequence counted by
    :func:`lcs_length`: rouge-score fills the whole table in Python, 1.9 s for two texts
    of 3000 words, holding the interpreter lock the whole time (the app's thread too)."""
    from rouge_score import scoring

    if not target or not prediction:
        return scoring.Score(precision=0, recall=0, fmeasure=0)
    common = lcs_length(target, prediction)
    precision, recall = common / len(prediction), common / len(target)
    return scoring.Score(precision=precision, recall=recall,
                         fmeasure=scoring.fmeasure(precision, recall))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """The length of the longest common subsequence of two token sequences.

    Bit-parallel (Allison & Dix 1986; Crochemore et al. 2001): a row of the dynamic
    programming table is the bits of one int over the longer sequence, and each token of
    the other updates it with four whole-int operations, so the inner loop runs in C.
    """
    if len(a) < len(b):
        a, b = b, a
    positions: dict[str, int] = {}
    for i, token in enumerate(a):
        positions[token] = positions.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full  # a 0 bit per match of the subsequence so far
    for token in b:
        match = positions.get(token)
        if match:
            kept = row & match
            row = ((row + kept) | (row - kept)) & full
    return len(a) - row.bit_count()


class _WordTokenizer:
    """rouge-score's tokenizer keeps only a-z and 0-9: Russian, Chinese or Greek text had no
    tokens at all, and identical answers scored 0. Here every text is split the same way,
    into Unicode words (each Chinese or Japanese character on its own), lower-cased; ASCII
    words longer than 3 letters are stemmed as rouge-score stems them. (Choosing the
    tokenizer per text made one en dash in an answer cost its stemming: 0.36 for the
    same words.)"""

    def __init__(self, stemmer: bool) -> None:
        from nltk.stem import porter

        # (a text repeats its words: each is stemmed once, ~10 us a word in Python)
        self._stem = functools.lru_cache(maxsize=50_000)(porter.PorterStemmer().stem) \
            if stemmer else None

    def tokenize(self, text: str) -> list[str]:
        tokens = words(text.lower())
        stem = self._stem
        if stem is None:
            return tokens
        return [stem(t) if len(t) > 3 and t.isascii() else t for t in tokens]


class Regex(_Named):
    """1 when the text matches a regular expression (``re.search``), else 0.

    Args:
        pattern: the expression (a string or a compiled pattern).
        flags: `re` flags for a string pattern (a compiled pattern carries its own).
        name: the feedback name (default ``"regex"``).
        must_match: False turns it around: 1 when the text does *not* match.

    Raises:
        ConfigurationError: an invalid expression, a bytes pattern, or flags given with a
            compiled pattern (they were ignored) — at definition, not once per record.
    """

    __slots__ = ("must_match", "name", "pattern")

    def __init__(self, pattern: str | re.Pattern[str], flags: int = 0, *,
                 name: str = "regex", must_match: bool = True) -> None:
        if isinstance(pattern, re.Pattern):
            if not isinstance(pattern.pattern, str):
                raise ConfigurationError(f"Regex needs a text pattern, not bytes: {pattern!r}")
            if flags:
                raise ConfigurationError(
                    "Regex: flags cannot be added to a compiled pattern; compile it with "
                    "them, or pass the expression as a string")
            self.pattern = pattern
        elif isinstance(pattern, str):
            try:
                self.pattern = re.compile(pattern, flags)
            except (re.error, ValueError, TypeError) as exc:
                raise ConfigurationError(
                    f"invalid regular expression {pattern!r}: {exc}") from exc
        else:
            raise ConfigurationError(f"Regex needs a string or a compiled pattern, got "
                                     f"{type(pattern).__name__}: {pattern!r}")
        self.name = name
        self.must_match = must_match

    def __call__(self, text: Any) -> tuple[float, str]:
        match = self.pattern.search(as_text(text, answer=True))
        found = (f"matches /{self.pattern.pattern}/ at character {match.start()}" if match
                 else f"does not match /{self.pattern.pattern}/")
        return float(bool(match) == self.must_match), found


class Contains(_Named):
    """The share of required phrases that the text contains (1 when all are there).

    Args:
        phrases: the phrases to look for.
        mode: ``"all"`` scores the share found; ``"any"`` gives 1 when one is found.
        case_sensitive: compare case as well.
        name: the feedback name (default ``"contains"``).

    Phrase and text are compared Unicode-normalized (NFKC) with runs of whitespace as one
    space: "New York" is found in "New\u00a0York" and across a line break.
    """

    __slots__ = ("case_sensitive", "mode", "name", "phrases")

    def __init__(self, phrases: str | Iterable[str], *, mode: Literal["all", "any"] = "all",
                 case_sensitive: bool = False, name: str = "contains") -> None:
        self.phrases = [phrases] if isinstance(phrases, str) else list(phrases)
        if not self.phrases or not all(isinstance(p, str) and p.strip() for p in self.phrases):
            # (a blank phrase is found in nearly any text, whatever the answer said)
            raise ConfigurationError("Contains needs one or more non-blank phrases")
        if mode not in ("all", "any"):
            raise ConfigurationError(f"Contains mode must be 'all' or 'any', got {mode!r}")
        self.mode = mode
        self.case_sensitive = case_sensitive
        self.name = name

    def _fold(self, text: str) -> str:
        text = " ".join(unicodedata.normalize("NFKC", text).split())
        return text if self.case_sensitive else text.casefold()

    def __call__(self, text: Any) -> tuple[float, str]:
        body = self._fold(as_text(text, answer=True))
        found = [p for p in self.phrases if self._fold(p) in body]
        missing = [p for p in self.phrases if p not in found]
        score = (float(bool(found)) if self.mode == "any"
                 else len(found) / len(self.phrases))
        parts = [f"found {len(found)} of {len(self.phrases)}"]
        if missing:
            parts.append("missing: " + ", ".join(repr(p) for p in missing[:10]))
        return score, "; ".join(parts)


class LengthBounds(_Named):
    """1 when the text's length is within the bounds, else 0 (with the length found).

    Args:
        min_chars, max_chars: bounds on the number of characters: Unicode characters of
            the NFC-normalized text, leading and trailing whitespace not counted.
        min_words, max_words: bounds on the number of words: runs of letters or digits
            between spaces (a lone "-" is none), each character of Chinese, Japanese,
            Thai, Lao, Khmer or Myanmar text one word.
        name: the feedback name (default ``"length_bounds"``).

    There are no token bounds: token counts depend on the model's tokenizer.
    """

    __slots__ = ("max_chars", "max_words", "min_chars", "min_words", "name")

    def __init__(self, *, min_chars: int | None = None, max_chars: int | None = None,
                 min_words: int | None = None, max_words: int | None = None,
                 name: str = "length_bounds") -> None:
        bounds = (min_chars, max_chars, min_words, max_words)
        if all(b is None for b in bounds):
            raise ConfigurationError("LengthBounds needs at least one bound")
        if any(b is not None and b < 0 for b in bounds):
            raise ConfigurationError("LengthBounds bounds must be >= 0")
        for low, high in ((min_chars, max_chars), (min_words, max_words)):
            if low is not None and high is not None and low > high:
                raise ConfigurationError(f"LengthBounds: minimum {low} > maximum {high}")
        self.min_chars, self.max_chars = min_chars, max_chars
        self.min_words, self.max_words = min_words, max_words
        self.name = name

    def __call__(self, text: Any) -> tuple[float, str]:
        body = unicodedata.normalize("NFC", as_text(text, answer=True)).strip()
        chars, words = len(body), _word_count(body)
        problems = []
        for value, unit, low, high in ((chars, "character", self.min_chars, self.max_chars),
                                       (words, "word", self.min_words, self.max_words)):
            if low is not None and value < low:
                problems.append(f"{_counted(value, unit)} < minimum {low}")
            if high is not None and value > high:
                problems.append(f"{_counted(value, unit)} > maximum {high}")
        if problems:
            return 0.0, "; ".join(problems)
        return 1.0, (f"{_counted(chars, 'character')}, {_counted(words, 'word')}: "
                     "within bounds")


_PIECES = re.compile(rf"[{_UNSPACED}]|[^\s{_UNSPACED}]+")


def _word_count(text: str) -> int:
    """Words as a reader counts them; Chinese (and the like) one per character: a Chinese
    paragraph was one word, and passed any ``max_words``."""
    return sum(1 for piece in _PIECES.findall(text) if any(c.isalnum() for c in piece))


def _counted(value: int, unit: str) -> str:
    return f"{value} {unit}" if value == 1 else f"{value} {unit}s"
