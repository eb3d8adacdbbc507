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

from scrutiny.core._missing import is_missing

__all__ = ["TRUNCATED_KEY", "Memo", "cut", "dumps", "encode", "encode_within", "fragment",
           "loads", "to_jsonable", "truncate_text"]

logger = logging.getLogger("scrutiny")

TRUNCATED_KEY = "__scrutiny_truncated__"
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z
_REPR_LIMIT = 2_000


def _describe(obj: Any) -> dict[str, Any]:
    """`obj`'s type and repr; when that repr failed or was cut, marked as a truncation."""
    reason = None
    try:
        text = repr(obj)
    except Exception as exc:  # a broken __repr__ must not break storage
        text = f"<repr failed: {type(exc).__name__}>"
        reason = f"it could not be stored, nor its repr ({type(exc).__name__})"
    if len(text) > _REPR_LIMIT:
        reason = f"it could not be stored: its repr of {len(text)} characters was cut"
        text = text[:_REPR_LIMIT] + "..."
    described = {"__type__": f"{type(obj).__module__}.{type(obj).__qualname__}",
                 "__repr__": text}
    return described if reason is None else _cut_marker(described, reason)


def _default(obj: Any) -> Any:
    """Called by orjson for every value it cannot encode natively."""
    try:
        if is_missing(obj):  # (pandas' NA and NaT, a table's missing cell: no value)
            return None
        if hasattr(obj, "model_dump") and callable(obj.model_dump):  # pydantic v2
            return _model_fields(obj)
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


def _model_fields(obj: Any) -> Any:
    """A pydantic model's fields: its JSON form, else (a field pydantic cannot dump as
    JSON — a numpy array, an arbitrary type) its fields as they are, encoded one by one;
    the whole model became one description before, its other fields lost."""
    try:
        return obj.model_dump(mode="json")
    except Exception:
        logger.debug("%s: dumping its fields as they are", type(obj).__name__, exc_info=True)
    try:
        return obj.model_dump()
    except Exception:
        fields = getattr(type(obj), "model_fields", None)
        if not isinstance(fields, Mapping):
            raise
        return {name: getattr(obj, name, None) for name in fields}


def _text(value: str) -> str:
    """A text orjson refuses (a lone surrogate: a file name decoded with surrogateescape)
    with that character as a backslash escape, as stored names are; it was stored as a
    description of the whole text, cut to 2,000 characters."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


class Memo:
    """`_default` for one encoding — or for the encodings of one record's parts, passed to
    each — converting each object once however often it occurs.

    A record's spans share their objects: every step of a LangGraph chat holds the same
    message objects of its history, and each was converted (a pydantic dump) once per
    occurrence — for a 60-turn chat, 14,580 dumps where 3,000 objects were distinct.
    """

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Any, Any]] = {}  # id -> (the object, its plain form)

    def default(self, obj: Any) -> Any:
        seen = self._seen.get(id(obj))
        if seen is not None and seen[0] is obj:
            return seen[1]
        plain = _default(obj)
        self._seen[id(obj)] = (obj, plain)  # (holding obj keeps its id its own)
        return plain


_MAX_DEPTH = 200  # orjson's own limit is 254 levels


def _sanitized(value: Any, depth: int = 0, seen: frozenset[int] = frozenset()) -> Any:
    """`value` with only the parts orjson refuses replaced (an int over 64 bits as text,
    a cycle or an over-deep level described, a key made text), so that one odd value
    does not turn a whole structure — a record's span tree — into a description."""
    if isinstance(value, int) and not isinstance(value, bool) and not (
            -(2 ** 63) <= value < 2 ** 64):
        return _int_text(value)
    if isinstance(value, str):
        return value if value.isascii() or _encodes(value) else _text(value)
    if isinstance(value, dict | list | tuple):
        if id(value) in seen:
            return {"__type__": type(value).__qualname__, "__repr__": "<cycle>"}
        if depth >= _MAX_DEPTH:
            return _cut_marker({"__type__": type(value).__qualname__,
                                "__repr__": "<nested too deep>"},
                               f"nested over {_MAX_DEPTH} levels deep: the levels below "
                               "were not stored")
        inner = seen | {id(value)}
        if isinstance(value, dict):
            return {_sanitized(_key_text(k), depth + 1, inner):
                    _sanitized(v, depth + 1, inner) for k, v in value.items()}
        return [_sanitized(v, depth + 1, inner) for v in value]
    try:
        orjson.dumps(value, default=_default, option=_OPTIONS)
        return value
    except Exception:
        try:  # its plain form may hold the odd parts (a model's fields, a dataclass's)
            plain = _default(value)
        except Exception:
            return _describe(value)
        if depth >= _MAX_DEPTH:
            return _cut_marker(_describe(value), f"nested over {_MAX_DEPTH} levels deep: "
                               "its fields were not stored")
        return _describe(value) if plain is value else _sanitized(plain, depth + 1, seen)


def _cut_marker(description: dict[str, Any], reason: str) -> dict[str, Any]:
    """A description put in place of a part not stored as it was, marked as a truncation
    (`reason` says what is missing), as values over the size limit are: a deferred
    feedback selecting it ends skipped, saying so, rather than scoring the description."""
    return {TRUNCATED_KEY: True, **description, "reason": reason}


def _int_text(value: int) -> Any:
    """An int orjson refuses (over 64 bits) as its decimal text; past Python's limit for
    that (`sys.get_int_max_str_digits()`, 4,300 digits) ``str`` raises ValueError, which
    replaced the whole structure holding it — a record's span tree — with a description:
    such an int is kept whole as hex, in a marker saying so."""
    try:
        return str(value)
    except ValueError:
        bits = value.bit_length()
        return _cut_marker({"__type__": "int", "__repr__": f"<int of {bits} bits>",
                            "hex": hex(value)},
                           f"an int of {bits} bits, over Python's limit of digits for "
                           "text, stored as hex")


def _key_text(key: Any) -> str:
    """A key as text (a giant int's own text fails: its hex then)."""
    if isinstance(key, str):
        return key
    try:
        return str(key)
    except ValueError:
        return hex(key) if isinstance(key, int) else f"<{type(key).__qualname__} key>"


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode(value: Any, memo: Memo | None = None) -> bytes:
    """`value` as JSON bytes, never raising (`memo`: the conversions shared by the
    encodings of one record's parts, each shared object converted once for all)."""
    try:
        return orjson.dumps(value, default=(memo or Memo()).default, option=_OPTIONS)
    except Exception as exc:  # recursion, a broken __getattr__, an int over 64 bits, ...
        logger.debug("encoding %s part by part: %r", type(value).__name__, exc)
    try:
        return orjson.dumps(_sanitized(value), default=_default, option=_OPTIONS)
    except Exception:
        logger.debug("describing %s", type(value).__name__, exc_info=True)
    try:
        return orjson.dumps(_cut_marker(_describe(value), "it could not be encoded as "
                                        "JSON: a description of it was stored"),
                            option=_OPTIONS)
    except Exception:
        return orjson.dumps({TRUNCATED_KEY: True, "__type__": "unserializable",
                             "reason": "it could not be encoded as JSON"})


def cut(value: Any, data: bytes, max_bytes: int) -> bytes:
    """`data` (`value` encoded), or over `max_bytes` the truncation marker for it."""
    return data if len(data) <= max_bytes else _truncated(value, len(data), data, max_bytes)


def encode_within(value: Any, max_bytes: int, memo: Memo | None = None) -> bytes:
    """`value` as JSON bytes within `max_bytes` (over it, its truncation marker). A text
    longer than that is cut without being encoded whole: a 50 MB answer was encoded in one
    go several times — ~250 MB of JSON, each piece holding the GIL, the app's other
    threads stalled up to 200 ms — to keep a 1 MB prefix."""
    if isinstance(value, str) and len(value) > max_bytes:  # (its JSON is longer still)
        return _truncated(value, _json_length(value), b"", max_bytes)
    return cut(value, encode(value, memo), max_bytes)


_PIECE = 1 << 20


def _json_length(text: str) -> int:
    """How long `text` is as JSON, measured a piece at a time (between pieces the app's
    threads get the GIL)."""
    size = 2
    for start in range(0, len(text), _PIECE):
        piece = text[start:start + _PIECE]
        try:
            size += len(orjson.dumps(piece)) - 2
        except orjson.JSONEncodeError:  # (a lone surrogate: stored as its escape)
            size += len(orjson.dumps(_text(piece))) - 2
    return size


def fragment(data: bytes) -> Any:
    """Encoded JSON to put in a value encoded later, as it is (not encoded again)."""
    if _Fragment is None:  # (orjson before 3.10: its plain form)
        return orjson.loads(data)
    return _Fragment(data)


_Fragment: Any = getattr(orjson, "Fragment", None)


def dumps(value: Any, *, max_bytes: int | None = None) -> str:
    """Encode `value` as JSON text, never raising; over `max_bytes`, a truncation marker
    (itself within `max_bytes`, with a prefix of the text when `value` is a string)."""
    data = encode(value) if max_bytes is None else encode_within(value, max_bytes)
    return data.decode("utf-8")


def _truncated(value: Any, whole: int, data: bytes, max_bytes: int) -> bytes:
    """The truncation marker for `value` (`whole` bytes as JSON, encoded as `data` unless
    it is a string), within `max_bytes`."""
    # A string keeps a prefix of its text (only that much of it encoded: each character is
    # a byte or more); anything else a prefix of its JSON.
    source = value[:max_bytes].encode("utf-8", "backslashreplace") if isinstance(
        value, str) else data
    budget = max(0, max_bytes - 100)
    for _ in range(4):  # escaping can grow the prefix: shrink until the marker fits
        preview = source[:budget].decode("utf-8", errors="ignore")
        marker = orjson.dumps(
            {TRUNCATED_KEY: True, "original_bytes": whole, "preview": preview})
        if len(marker) <= max_bytes or budget == 0:
            return marker
        budget = int(budget * max_bytes / len(marker) * 0.9)
    return orjson.dumps({TRUNCATED_KEY: True, "original_bytes": whole})


def truncate_text(value: Any, max_bytes: int) -> Any:
    """A string cut to about `max_bytes` of UTF-8 with an explicit marker; others as is."""
    if not isinstance(value, str) or len(value) * 4 <= max_bytes:
        return value
    # (an ASCII text's length is its size: only the kept prefix is encoded)
    whole = len(value) if value.isascii() else len(
        value.encode("utf-8", "backslashreplace"))  # (a lone surrogate as its escape)
    if whole <= max_bytes:
        return value
    marker = f"[{TRUNCATED_KEY}: {whole} bytes in all]"  # (counted in the limit)
    data = value[:max_bytes].encode("utf-8", "backslashreplace")
    kept = data[:max(0, max_bytes - len(marker))].decode("utf-8", errors="ignore")
    return kept + marker


def loads(text: str | None) -> Any:
    """Decode JSON text stored by :func:`dumps` (None stays None)."""
    if text is None:
        return None
    return orjson.loads(text)


def to_jsonable(value: Any, *, max_bytes: int | None = None) -> Any:
    """The plain JSON-compatible form of `value` (what is stored and read back)."""
    return loads(dumps(value, max_bytes=max_bytes))
