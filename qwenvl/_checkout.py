"""An upstream Qwen-VL fine-tuning checkout beside the installed qwenvl.

The upstream fine-tuning code (QwenLM's ``qwen-vl-finetune/``) keeps its modules in a folder also named
``qwenvl/`` (``qwenvl/data/data_processor.py``, ``qwenvl/train/argument.py``, ...) and puts the checkout on
``sys.path`` at run time. Python has one ``qwenvl`` package: ours, once installed. So that the checkout's
modules stay importable under their own names, ``qwenvl``, ``qwenvl.data`` and ``qwenvl.train`` search a
:class:`CheckoutPath`: our folder first (every module of ours keeps its name and its meaning), then the same
folder of every other ``sys.path`` entry, looked up when a module is imported, as a namespace package does::

    sys.path   [..., site-packages, /src/qwen-vl-finetune]
    qwenvl.data.__path__   site-packages/qwenvl/data, /src/qwen-vl-finetune/qwenvl/data
    import qwenvl.data.collators        -> ours
    import qwenvl.data.data_processor   -> the checkout's (we have none)

A name a package of ours lacks is looked up in the checkout's ``__init__.py`` of the same package
(:func:`checkout_attribute`; upstream's ``qwenvl/data/__init__.py`` holds its dataset registry, which its
``data_processor`` reads with ``from . import data_list``). Where both trees have a module of the same name
(``qwenvl/train/argument.py``), ours wins: :func:`qwenvl.train.upstream.install` is the explicit switch
to the checkout's. Nothing here runs a checkout's code at import; it is read only when asked for.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

__all__ = ["CheckoutPath", "checkout_attribute", "checkout_file"]


class CheckoutPath:
    """A package's ``__path__``: its own folder, then that package's folder in every other ``sys.path`` entry.

    Recomputed on each use, so a checkout appended to ``sys.path`` after ``import qwenvl`` is still seen
    (upstream's ``train_qwen.py`` appends its root before importing anything from it). Folders are compared by
    their real path, so our own source tree on ``sys.path`` (an editable install, a test run from the
    checkout) is never listed twice.
    """

    def __init__(self, own: list[str], package: str) -> None:
        self._own = list(own)
        self._parts = package.split(".")

    def _entries(self) -> list[str]:
        entries = list(self._own)
        seen = {os.path.realpath(p) for p in entries}
        for root in sys.path:
            if not isinstance(root, str):
                continue
            folder = os.path.join(root or os.getcwd(), *self._parts)
            real = os.path.realpath(folder)
            if real not in seen and os.path.isdir(folder):
                seen.add(real)
                entries.append(folder)
        return entries

    def checkouts(self) -> list[str]:
        """The other trees' folders of this package (not ours)."""
        return self._entries()[len(self._own) :]

    def __iter__(self):
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())

    def __getitem__(self, index):
        return self._entries()[index]

    def __contains__(self, item) -> bool:
        return item in self._entries()

    def append(self, item: str) -> None:  # what importlib and pkgutil may do to a package's path
        self._own.append(item)

    def __repr__(self) -> str:
        return f"CheckoutPath({self._entries()!r})"


_LOADED: dict[str, ModuleType] = {}


def checkout_file(path: CheckoutPath, filename: str) -> str | None:
    """The first checkout's ``filename`` in this package's folder, or ``None``."""
    for folder in path.checkouts():
        candidate = os.path.join(folder, filename)
        if os.path.isfile(candidate):
            return candidate
    return None


def load_checkout_module(package: str, file: str, name: str) -> ModuleType:
    """Execute a checkout's ``file`` as the module ``name`` of ``package`` (its relative imports resolve in
    ``package``, whose path reaches the checkout). Loaded once per name."""
    if name in _LOADED:
        return _LOADED[name]
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    _LOADED[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del _LOADED[name]
        raise
    return module


def checkout_attribute(package: str, path: CheckoutPath, name: str):
    """``name`` from a checkout's ``__init__.py`` of ``package``: the fallback of our package's ``__getattr__``.

    Raises ``AttributeError`` (as a module lacking the name does) when no checkout defines it. Dunder names are
    never looked up there (tools probe modules for them).
    """
    if not (name.startswith("__") and name.endswith("__")):
        file = checkout_file(path, "__init__.py")
        if file is not None:
            module = load_checkout_module(package, file, f"{package}.__checkout_init__")
            if hasattr(module, name):
                return getattr(module, name)
    raise AttributeError(f"module {package!r} has no attribute {name!r}")
