"""``"module:attr"`` references: how the reader and step registries name code.

Curation runs its tasks in spawned worker processes, which import modules fresh: a function
registered at runtime in the parent (by a test, a notebook, or a higher layer such as a
model-based quality step) does not exist in a worker's registry. So registries keep an
importable ``"module:attr"`` path for every entry rather than the object; the parent sends
its entries (plain strings) along with each task, and the worker imports what it needs when
it needs it (`load`). Nothing heavy is imported to register a format or a step.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_path", "load"]

_LOADED: dict[str, Any] = {}


def import_path(obj: Any, what: str) -> str:
    """``"module:qualname"`` of a module-level function or class; a string is checked for shape.

    A lambda, a nested function or a method of an instance cannot be found by a spawned worker:
    those raise ``TypeError`` naming `what` (e.g. ``"reader 'csv'"``).
    """
    if isinstance(obj, str):
        mod, sep, attr = obj.partition(":")
        if not (mod and sep and attr):
            raise ValueError(f"{what}: {obj!r} is not a 'module:attr' path")
        return obj
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not mod or not qual or "<" in qual:
        raise TypeError(f"{what}: {obj!r} is not importable by a worker process; register a "
                        "module-level function or class, or its 'module:attr' path")
    path = f"{mod}:{qual}"
    _LOADED[path] = obj
    return path


def load(path: str) -> Any:
    """The object a ``"module:attr"`` path names (imported on first use, then cached)."""
    obj = _LOADED.get(path)
    if obj is None:
        mod, _, attr = path.partition(":")
        try:
            obj = importlib.import_module(mod)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise ImportError(f"cannot load {path!r}: {type(e).__name__}: {e}") from e
        _LOADED[path] = obj
    return obj
