"""References to functions by import path, so another process (a worker) can load them."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

__all__ = ["NotReferenceable", "reference", "resolve"]


class NotReferenceable(ValueError):
    """The object cannot be loaded by import path; the message says why and what to do."""


def reference(obj: Any) -> str:
    """`module:qualname` of `obj`, checked to load back to the same object.

    Raises:
        NotReferenceable: a lambda, a closure, a bound method, a callable object, or a
            function of `__main__`.
    """
    target = obj
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    name = getattr(target, "__name__", repr(target))
    if inspect.ismethod(target) and not isinstance(target.__self__, type):
        raise NotReferenceable(
            f"{name} is a method bound to an object, which a worker cannot import; wrap it "
            "in a module-level function (def my_feedback(...): return my_object.method(...))")
    if not qualname:
        # A callable object (a provider such as PIIDetector(), a functools.partial): the
        # message named only its repr, with nothing to do about it.
        raise NotReferenceable(
            f"{type(target).__name__}(...) is a callable object, not a function or class "
            "that a worker can import by name; create it at module level and wrap it in a "
            "module-level function (def my_feedback(...): return my_object(...))")
    if not module:
        raise NotReferenceable(f"{name!s} has no module to import it by")
    if "<lambda>" in qualname:
        raise NotReferenceable(
            "a lambda cannot be imported by a worker; define the function with `def` at "
            "module level")
    if "<locals>" in qualname:
        raise NotReferenceable(
            f"{qualname} is defined inside a function; define it at module level")
    if module == "__main__":
        raise NotReferenceable(
            f"{qualname} is defined in the script being run (__main__), which a worker "
            "cannot import; move it into a module")
    path = f"{module}:{qualname}"
    try:
        loaded = resolve(path)
    except Exception as exc:
        raise NotReferenceable(f"{path} cannot be imported: {exc}") from exc
    if loaded is not obj and getattr(loaded, "__func__", loaded) is not getattr(
            obj, "__func__", obj):
        raise NotReferenceable(f"{path} imports to a different object than the one given")
    return path


def resolve(path: str) -> Any:
    """Load `module:qualname`."""
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise ValueError(f"not an import path of the form 'module:name': {path!r}")
    value: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value
