"""Import LibMTL 1.1.5's weighting modules for side-by-side checks (tests, benchmarks).

LibMTL's package ``__init__`` files import torchvision and its trainers; its weighting
modules themselves need only torch and numpy. :func:`weighting_module` loads one of them under
stub ``LibMTL`` / ``LibMTL.weighting`` packages that run no ``__init__``, then restores
``sys.modules`` as it was. Used by ``tests/conftest.py`` (the ``reference`` tests) and
``benchmarks/step_speed.py``; nothing in the library itself depends on LibMTL.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types

VERSION = "1.1.5"
INSTALL = f"pip install --no-deps LibMTL=={VERSION}"


def weighting_module(name: str) -> types.ModuleType:
    """``LibMTL.weighting.<name>`` (e.g. ``"PCGrad"``) of an installed LibMTL 1.1.5.

    Raises:
        ImportError: LibMTL is not installed, is not version 1.1.5, or the module fails to
            import; the message says which.
    """
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"LibMTL is not installed ({INSTALL})")
    try:
        version = importlib.metadata.version("LibMTL")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != VERSION:
        raise ImportError(f"written for LibMTL {VERSION}, found {version}")
    root = next(iter(spec.submodule_search_locations))

    def ours(key: str) -> bool:
        return key == "LibMTL" or key.startswith("LibMTL.")

    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    try:
        for k in saved:
            del sys.modules[k]
        package = types.ModuleType("LibMTL")
        package.__path__ = [root]
        weighting = types.ModuleType("LibMTL.weighting")
        weighting.__path__ = [f"{root}/weighting"]
        package.weighting = weighting  # type: ignore[attr-defined]
        sys.modules["LibMTL"] = package
        sys.modules["LibMTL.weighting"] = weighting
        return importlib.import_module(f"LibMTL.weighting.{name}")
    except ImportError as error:
        raise ImportError(f"cannot import LibMTL.weighting.{name}: {error!r}") from error
    finally:
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
