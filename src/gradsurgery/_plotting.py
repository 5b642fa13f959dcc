"""matplotlib, imported on demand with the file-only Agg backend (an optional extra)."""

from __future__ import annotations

from typing import Any

INSTALL = "pip install 'gradsurgery[plot]'  (or: pip install matplotlib)"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend; ``ImportError`` with the install command."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"plots need matplotlib: {INSTALL}") from e
    return plt
