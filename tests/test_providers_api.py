"""The providers' public surface is pinned, and importing it stays cheap."""

from __future__ import annotations

import subprocess
import sys

import scrutiny.providers


def test_provider_exports() -> None:
    assert scrutiny.providers.__all__ == [
        "Contains", "Embeddings", "GroundTruth", "LLMJudge", "LengthBounds", "PIIDetector",
        "PIIMatch", "RagTriad", "Regex", "Rouge", "TransientJudgeError", "bleu",
        "exact_match", "rag_triad", "sentiment", "token_f1",
    ]
    assert scrutiny.providers.__all__ == sorted(scrutiny.providers.__all__,
                                                key=lambda n: (n[0].islower(), n))
    for name in scrutiny.providers.__all__:
        assert hasattr(scrutiny.providers, name)


def test_importing_providers_imports_no_framework_or_heavy_dependency() -> None:
    code = (
        "import sys, threading, scrutiny.providers\n"
        "heavy = ('langchain', 'llama_index', 'torch', 'sentence_transformers', "
        "'transformers', 'rouge_score', 'nltk', 'vaderSentiment')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith(heavy)}))\n"
        "print(threading.active_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "1"]
