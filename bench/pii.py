"""PII detection time on text full of long signed numbers, against plain prose.

A "+" before a long run of digits made the phone pattern try every way of splitting the
run into groups (about 2 ms each): a 1 MB table of such numbers took 46 s on an evaluation
thread. Both texts are the same length; `ratio` = signed numbers / prose (about 1 when the
detection is linear in the text, hundreds when it backtracks).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, median, r

from scrutiny.providers import PIIDetector

REPEATS = 5


def timed(detector: PIIDetector, text: str) -> float:
    runs = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        detector.find(text)
        runs.append(time.perf_counter() - started)
    return median(runs)


def main() -> None:
    detector = PIIDetector()
    signed = ("+1" + "2" * 50 + " ") * 3000
    prose = ("The quick brown fox jumps over the lazy dog, twice. " * 3000)[:len(signed)]
    detector.find(prose)  # (compiles the patterns)
    t_signed, t_prose = timed(detector, signed), timed(detector, prose)
    emit({"bench": "pii", "chars": len(signed), "signed_numbers_s": r(t_signed, 4),
          "prose_s": r(t_prose, 4), "ratio": r(t_signed / t_prose, 2)})


if __name__ == "__main__":
    main()
