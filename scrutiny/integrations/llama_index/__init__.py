"""Record LlamaIndex query engines, chat engines, retrievers, workflows and agents.

Built on LlamaIndex's own instrumentation (a span handler and an event handler on the root
dispatcher, added on first use of a recorder). Importing this module needs
`llama-index-core` (``pip install 'scrutiny[llama-index]'``).
"""

from __future__ import annotations

try:
    import llama_index.core  # noqa: F401
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
    raise ModuleNotFoundError(
        "scrutiny.integrations.llama_index needs llama-index-core: "
        "pip install 'scrutiny[llama-index]'"
    ) from exc

from scrutiny.integrations.llama_index._events import FeedbackResultEvent
from scrutiny.integrations.llama_index._recorder import LlamaIndexRecorder, Recording

__all__ = ["FeedbackResultEvent", "LlamaIndexRecorder", "Recording"]
