"""Record LangChain apps: a callback handler and a recorder built on it.

Importing this module needs `langchain-core` (``pip install 'scrutiny[langchain]'``).
"""

from __future__ import annotations

try:
    import langchain_core  # noqa: F401
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
    raise ModuleNotFoundError(
        "scrutiny.integrations.langchain needs langchain-core: "
        "pip install 'scrutiny[langchain]'"
    ) from exc

from scrutiny.integrations.langchain._handler import FEEDBACK_EVENT, ScrutinyCallbackHandler
from scrutiny.integrations.langchain._recorder import ChainRecorder, Recording

__all__ = ["FEEDBACK_EVENT", "ChainRecorder", "Recording", "ScrutinyCallbackHandler"]
