"""The options of ``qwenvl.patch``, one name each, the same in ``qwenvl train`` and ``qwenvl verify``::

    qwenvl.patch(model, backend="sdpa", linear_backend="auto", compile=True, fused_cross_entropy=True)
    qwenvl.patch(model, options=PatchOptions(backend="sdpa", compile=True))
    qwenvl train ... --backend sdpa --linear_backend auto --compile True --fused_cross_entropy True
    qwenvl verify ... --backend sdpa --linear_backend auto --compile --fused_cross_entropy

``CHOICES`` is the one table of valid values: ``PatchOptions`` checks against it, and both commands' help and
errors are written from it and from each field's ``help``. Both commands take every option spelled with ``_``
(the name) or ``-`` (transformers' ``HfArgumentParser`` does that for ``qwenvl train``, and ``qwenvl verify``
does the same). A name an option had before (``RENAMED``) still works, with a one-line note naming the new one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from typing import NamedTuple, Sequence

from qwenvl.attention._registry import BACKENDS

__all__ = ["PatchOptions", "InvalidOption", "CHOICES", "LINEAR_BACKENDS", "RENAMED", "option_help", "current_names"]

# How hybrid families' linear-attention layers run packed rows: the paths of ``qwenvl.patches._linear``.
LINEAR_BACKENDS = ("segments", "batched", "torch", "fla")


class Choices(NamedTuple):
    what: str  # what an error calls the option
    values: tuple[str, ...]  # the valid values, the default first


CHOICES = {
    "backend": Choices("attention backend", ("auto", *BACKENDS)),
    "linear_backend": Choices("linear_backend", ("auto", *LINEAR_BACKENDS)),
}


def _one_of(name: str) -> str:
    return ", ".join(CHOICES[name].values)


class InvalidOption(ValueError):
    """A value outside ``CHOICES``: ``str()`` names the keyword, ``flag()`` the command-line option."""

    def __init__(self, name: str, value) -> None:
        self.name, self.value = name, value
        super().__init__(f"unknown {CHOICES[name].what} {value!r}; choose one of: {_one_of(name)}")

    def flag(self) -> str:
        return f"--{self.name} {self.value!r} is not one of {_one_of(self.name)}"


@dataclass(frozen=True)
class PatchOptions:
    """What ``qwenvl.patch`` does besides making the families take packed batches; checked when made.

    ``compile`` and ``fused_cross_entropy`` act on one model: ``qwenvl.patch`` needs ``model`` for them. Reverting
    the patch undoes both. Each field's ``help`` is what ``qwenvl train --help`` and ``qwenvl verify --help`` say.
    """

    backend: str = field(
        default="auto",
        metadata={
            "help": f"Varlen attention backend: {_one_of('backend')} ('auto' picks per call, see "
            "qwenvl.attention.available_backends; 'reference' is the float64 oracle, slow)."
        },
    )
    linear_backend: str = field(
        default="auto",
        metadata={
            "help": f"How the Gated DeltaNet layers of hybrid families (Qwen3.5) run packed rows: "
            f"{_one_of('linear_backend')} ('auto': flash-linear-attention on CUDA where it can run the call, else "
            "exact per-sample paths; see qwenvl.patches._linear)."
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "Compile each decoder layer and vision block on its own (regional compilation, the packed "
            "token dimension dynamic)."
        },
    )
    fused_cross_entropy: bool = field(
        default=False,
        metadata={
            "help": "In training with labels, the loss from the final hidden states a chunk of tokens at a time, "
            "never the whole logits, no host sync; sample boundaries are never crossed."
        },
    )

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices.values:
                raise InvalidOption(name, getattr(self, name))


def option_help(name: str) -> str:
    """The help of ``PatchOptions``' field ``name``."""
    return next(f.metadata["help"] for f in fields(PatchOptions) if f.name == name)


# The names options had before they took the one they have everywhere, per command: still accepted, with a note.
RENAMED = {
    "train": {"--attention_backend": "--backend", "--compile_regions": "--compile"},
    "verify": {"--convention": "--packing_convention"},
}


def current_names(command: str, argv: Sequence[str]) -> list[str]:
    """``argv`` with each old name of an option of ``command`` (``RENAMED``, spelled with ``_`` or ``-``, also as
    ``--old=value``) replaced by its name; a one-line note on stderr for each old name used."""
    renamed = {}
    for old, new in RENAMED[command].items():
        renamed[old] = renamed["--" + old[2:].replace("_", "-")] = new
    out, noted = [], set()
    for arg in argv:
        flag, equals, value = arg.partition("=")
        if flag in renamed:
            if flag not in noted:
                noted.add(flag)
                print(f"qwenvl {command}: {flag} is deprecated, use {renamed[flag]} (same values)", file=sys.stderr)
            arg = renamed[flag] + equals + value
        out.append(arg)
    return out
