"""Judge-answer parsing time on answers padded with long runs of blank space.

A small model that pads its answer with blank lines, or a code fence cut off at the output
limit, met patterns whose optional runs of spaces sat side by side: the regex engine tried
every way of splitting a long run (cubic; 1,000 spaces ran for minutes). `ratio` = padded
answers / answers of the same length made of words (about 1 when parsing is linear).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, median, r

from scrutiny import InvalidFeedbackValue
from scrutiny.providers._parse import parse_score

PAD = 20_000
REPEATS = 5


def timed(answers: list[str]) -> float:
    runs = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        for answer in answers:
            with contextlib.suppress(InvalidFeedbackValue):
                parse_score(answer)
        runs.append(time.perf_counter() - started)
    return median(runs)


def main() -> None:
    padded = ["9" + "\n" * PAD + "Reasons: on topic", "9" + " " * PAD + "- on topic",
              "```json" + " " * PAD + '{"score": 7}', "Score:" + " " * PAD + "7"]
    words = [a[:1] + ("word " * PAD)[:len(a) - 1] for a in padded]
    timed(words)
    t_padded, t_words = timed(padded), timed(words)
    emit({"bench": "parse", "pad_chars": PAD, "padded_s": r(t_padded, 4),
          "words_s": r(t_words, 4), "ratio": r(t_padded / t_words, 2)})


if __name__ == "__main__":
    main()
