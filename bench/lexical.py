"""ROUGE-L time on long answers: Scrutiny's `Rouge("rougeL")` against rouge-score's own
scorer with the same tokenizer, on the same pairs of texts (and the same scores).

A sync feedback holds the interpreter lock while it computes, so its time is also time the
application's thread waits. rouge-score fills the whole longest-common-subsequence table in
Python (quadratic); Scrutiny counts the subsequence bit-parallel. `speedup` = rouge-score's
median time / Scrutiny's, per text length in words.
"""

from __future__ import annotations

import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, median, r

from scrutiny.providers import Rouge

LENGTHS = (100, 1000, 3000)
REPEATS = 3
TEXT = ("the capital of france is paris which lies on the river seine and is known for "
        "its museums tower cafes bridges history art fashion food wine")
WORDS = TEXT.split()


def timed(fn: object, pair: tuple[str, str]) -> tuple[float, float]:
    runs, score = [], 0.0
    for _ in range(REPEATS):
        started = time.perf_counter()
        score = fn(*pair)  # type: ignore[operator]
        runs.append(time.perf_counter() - started)
    return median(runs), score


def main() -> None:
    from rouge_score import rouge_scorer

    rng = random.Random(3)
    ours = Rouge("rougeL")
    ours("warm up", "warm up")  # (loads rouge-score and the stemmer once)
    theirs = rouge_scorer.RougeScorer(["rougeL"], tokenizer=ours._tokenizer)
    out = {}
    for n in LENGTHS:
        pair = (" ".join(rng.choice(WORDS) for _ in range(n)),
                " ".join(rng.choice(WORDS) for _ in range(n)))
        t_ours, s_ours = timed(lambda a, e: ours(a, e)[0], pair)
        t_theirs, s_theirs = timed(
            lambda a, e: theirs.score(e, a)["rougeL"].fmeasure, pair)
        out[str(n)] = {"scrutiny_ms": r(t_ours * 1e3, 2), "rouge_score_ms": r(t_theirs * 1e3, 1),
                       "speedup": r(t_theirs / t_ours, 1), "same_score": s_ours == s_theirs}
    emit({"bench": "lexical_rouge_l", "words": out,
          "pass": all(v["same_score"] for v in out.values())})


if __name__ == "__main__":
    main()
