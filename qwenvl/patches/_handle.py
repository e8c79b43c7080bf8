"""Recorded, reversible attribute patches (in the manner of pytest's MonkeyPatch)."""

from __future__ import annotations

from typing import Any

__all__ = ["PatchRecorder", "MISSING"]


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


class PatchRecorder:
    """Sets attributes and remembers ``(owner, name, old)`` so they can be undone in reverse order.

    Setting a missing attribute raises unless ``create=True``: a patch target that vanished from a new
    transformers release must be an error, never a silent no-op.
    """

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []

    def setattr(self, owner: Any, name: str, value: Any, *, create: bool = False) -> None:
        old = owner.__dict__.get(name, MISSING) if isinstance(owner, type) else getattr(owner, name, MISSING)
        if old is MISSING and not create and not hasattr(owner, name):
            raise AttributeError(f"{owner!r} has no attribute {name!r} to patch")
        self._undo.append((owner, name, old))
        setattr(owner, name, value)

    def undo(self) -> None:
        while self._undo:
            owner, name, old = self._undo.pop()
            if old is MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)

    def __len__(self) -> int:
        return len(self._undo)
