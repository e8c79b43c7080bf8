"""Which transformers releases the patches support, checked when a patch is applied (not at import)."""

from __future__ import annotations

import warnings

from packaging.version import Version

__all__ = ["MIN_VERSION", "MAX_VERSION_EXCLUSIVE", "TESTED_VERSIONS", "UnsupportedTransformersVersion", "check_transformers_version"]

MIN_VERSION = Version("4.57.0")
MAX_VERSION_EXCLUSIVE = Version("6.0.0")
# The releases the parity matrix runs (pyproject.toml [tool.qwenvl] transformers-matrix).
TESTED_VERSIONS = ("4.57.6", "5.0.0", "5.10.4", "5.24.0")


class UnsupportedTransformersVersion(RuntimeError):
    pass


def supported_range() -> str:
    return f">={MIN_VERSION},<{MAX_VERSION_EXCLUSIVE}"


def installed_version() -> str:
    import transformers

    return transformers.__version__


def check_transformers_version(version: str | None = None) -> Version:
    """Raise ``UnsupportedTransformersVersion`` naming the installed release and the supported range."""
    if version is None:
        version = installed_version()
    installed = Version(version)
    if not MIN_VERSION <= Version(installed.base_version) < MAX_VERSION_EXCLUSIVE:
        raise UnsupportedTransformersVersion(
            f"transformers {version} is not supported by qwenvl's patches; supported range: {supported_range()} "
            f"(tested: {', '.join(TESTED_VERSIONS)})"
        )
    if Version(installed.base_version) > Version(TESTED_VERSIONS[-1]):
        warnings.warn(
            f"transformers {version} is newer than the newest release qwenvl was tested on ({TESTED_VERSIONS[-1]}); "
            "the patch checks its targets, but run `qwenvl verify` to prove parity on it",
            stacklevel=3,
        )
    return installed
