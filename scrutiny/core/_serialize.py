"""Safe, bounded JSON for anything an application returns.

Nothing here raises: a value orjson cannot encode natively is turned into a plain form
(pydantic models and dataclasses into their fields, sets into lists, bytes into a short
description) and, as a last resort, into a description with its type and `repr`. A payload
over the size limit is replaced by an explicit truncation marker holding a prefix of it.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["TRUNCATED_KEY", "dumps", "loads", "to_jsonable", "truncate_text"]

logger = logging.getLogger("scrutiny")

TRUNCATED_KEY = "__scrutiny_truncated__"
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z
_REPR_LIMIT = 2_000


def _describe(obj: Any) -> dict[str, Any]:
    try:
        text = repr(obj)
    except Exception as exc:  # a broken __repr__ must not break storage
        text = f"<repr failed: {type(exc).__name__}>"
    if len(text) > _REPR_LIMIT:
        text = text[:_REPR_LIMIT] + "..."
    return {"__type__": f"{type(obj).__module__}.{type(obj).__qualname__}", "__repr__": text}


def _default(obj: Any) -> Any:
    """Called by orjson for every value it cannot encode natively."""
    try:
        if hasattr(obj, "model_dump") and callable(obj.model_dump):  # pydantic v2
            return obj.model_dump(mode="json")
        if hasattr(obj, "dict") and hasattr(obj, "__fields__"):  # pydantic v1 objects
            return obj.dict()
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: getattr(obj, f.name, None) for f in dataclasses.fields(obj)}
        if isinstance(obj, set | frozenset):
            return sorted(obj, key=repr)
        if isinstance(obj, bytes | bytearray | memoryview):
            data = bytes(obj)
            return {"__type__": "bytes", "length": len(data), "preview": data[:64].hex()}
        if isinstance(obj, enum.Enum):
            return obj.value
        if isinstance(obj, uuid.UUID):
            return str(obj)
        if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays of objects
            return obj.tolist()
        if isinstance(obj, Mapping):
            return {str(k): v for k, v in obj.items()}
        if isinstance(obj, tuple | list):
            return list(obj)
    except Exception:  # fall through to the description
        logger.debug("could not convert %s for storage", type(obj).__name__, exc_info=True)
    return _describe(obj)


def dumps(value: Any, *, max_bytes: int | None = None) -> str:
    """Encode `value` as JSON text, never raising; over `max_bytes`, a truncation marker."""
    try:
        data = orjson.dumps(value, default=_default, option=_OPTIONS)
    except Exception as exc:  # recursion, a broken __getattr__, an int over 64 bits, ...
        logger.debug("falling back to a description of %s: %r", type(value).__name__, exc)
        try:
            data = orjson.dumps(_describe(value), option=_OPTIONS)
        except Exception:
            data = b'{"__type__": "unserializable"}'
    if max_bytes is not None and len(data) > max_bytes:
        preview = data[:max_bytes].decode("utf-8", errors="ignore")
        data = orjson.dumps(
            {TRUNCATED_KEY: True, "original_bytes": len(data), "preview": preview}
        )
    return data.decode("utf-8")


def truncate_text(value: Any, max_bytes: int) -> Any:
    """A string cut to about `max_bytes` of UTF-8 with an explicit marker; others as is."""
    if not isinstance(value, str) or len(value) * 4 <= max_bytes:
        return value
    data = value.encode("utf-8")
    if len(data) <= max_bytes:
        return value
    kept = data[:max_bytes].decode("utf-8", errors="ignore")
    return f"{kept}[{TRUNCATED_KEY}: {len(data)} bytes in all]"


def loads(text: str | None) -> Any:
    """Decode JSON text stored by :func:`dumps` (None stays None)."""
    if text is None:
        return None
    return orjson.loads(text)


def to_jsonable(value: Any, *, max_bytes: int | None = None) -> Any:
    """The plain JSON-compatible form of `value` (what is stored and read back)."""
    return loads(dumps(value, max_bytes=max_bytes))
