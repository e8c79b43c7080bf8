"""Which transformers releases the patches support, checked when a patch is applied (not at import)."""

from __future__ import annotations

import logging

from packaging.version import Version

__all__ = [
    "MIN_VERSION",
    "MAX_VERSION_EXCLUSIVE",
    "TESTED_VERSIONS",
    "UnsupportedTransformersVersion",
    "check_transformers_version",
    "newer_than_tested",
]

MIN_VERSION = Version("4.57.0")
MAX_VERSION_EXCLUSIVE = Version("6.0.0")
# The release matrix, its one list: the releases the parity tests run on (noxfile.py reads this line; each has
# its locks/tf-<release>.txt). The first is the oldest supported, the last the newest tested (the goldens' pin).
TESTED_VERSIONS = ("4.57.6", "5.0.0", "5.10.4", "5.24.0", "5.25.0")


class UnsupportedTransformersVersion(RuntimeError):
    pass


_logger = logging.getLogger("qwenvl")
_warned: set[str] = set()


def supported_range() -> str:
    return f">={MIN_VERSION},<{MAX_VERSION_EXCLUSIVE}"


def installed_version() -> str:
    import transformers

    return transformers.__version__


def newer_than_tested(version: str | None = None) -> bool:
    """Whether the installed (or given) release is newer than the newest one the matrix runs."""
    installed = Version(installed_version() if version is None else version)
    return Version(installed.base_version) > Version(TESTED_VERSIONS[-1])


def check_transformers_version(version: str | None = None, *, warn: bool = True) -> Version:
    """Raise ``UnsupportedTransformersVersion`` naming the installed release and the supported range.

    A release inside the range but newer than the newest tested one is patched (the patch checks its targets);
    ``warn`` says so once per process and release, on the ``qwenvl`` logger; ``warn=False`` means the caller
    tells the user itself (``qwenvl verify``, which is the check the warning asks for), and later checks in the
    process stay quiet too.
    """
    if version is None:
        version = installed_version()
    installed = Version(version)
    if not MIN_VERSION <= Version(installed.base_version) < MAX_VERSION_EXCLUSIVE:
        raise UnsupportedTransformersVersion(
            f"transformers {version} is not supported by qwenvl's patches; supported range: {supported_range()} "
            f"(tested: {', '.join(TESTED_VERSIONS)})"
        )
    if newer_than_tested(version) and version not in _warned:
        _warned.add(version)
        if not warn:
            return installed
        _logger.warning(
            "qwenvl: transformers %s is newer than the newest release qwenvl was tested on (%s); the patch checks "
            "its targets, but run `qwenvl verify` once to prove parity on it",
            version,
            TESTED_VERSIONS[-1],
        )
    return installed
