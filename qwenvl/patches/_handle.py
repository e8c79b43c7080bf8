"""Recorded, reversible patches (in the manner of pytest's MonkeyPatch)."""

from __future__ import annotations

import functools
from typing import Any, Callable

__all__ = ["PatchRecorder", "MISSING", "WRAPPED"]


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()

# The attribute a wrapper function carries naming the function it wraps (so a patch is recognised as ours).
WRAPPED = "__qwenvl_wrapped__"


def _restore(owner: Any, name: str, old: Any) -> None:
    if old is MISSING:
        delattr(owner, name)
    else:
        setattr(owner, name, old)


class PatchRecorder:
    """Sets attributes and remembers ``(owner, name, old)`` so they can be undone in reverse order.

    Setting a missing attribute raises unless ``create=True``: a patch target that vanished from a new
    transformers release must be an error, never a silent no-op. A change made through a library's own API
    (a registry's ``register``) records its undo with ``add_undo``; it runs in the same reverse order.
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def setattr(self, owner: Any, name: str, value: Any, *, create: bool = False) -> None:
        old = owner.__dict__.get(name, MISSING) if isinstance(owner, type) else getattr(owner, name, MISSING)
        if old is MISSING and not create and not hasattr(owner, name):
            raise AttributeError(f"{owner!r} has no attribute {name!r} to patch")
        self._undo.append(functools.partial(_restore, owner, name, old))
        setattr(owner, name, value)

    def add_undo(self, undo: Callable[[], None]) -> None:
        """Record ``undo`` for a change the caller has just made."""
        self._undo.append(undo)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __len__(self) -> int:
        return len(self._undo)
