"""Checkpoints that survive a crash and never unpickle arbitrary objects.

* A checkpoint is a dict of tensors and plain containers (str, int, float, bool, None, list,
  tuple, dict), saved with :func:`torch.save` and loaded with ``torch.load(...,
  weights_only=True)``, so loading a file cannot run code.
* Writes are atomic: the data goes to a temporary file in the same directory, which is flushed,
  fsynced and renamed over the target (``os.replace`` is atomic on POSIX and Windows), then the
  directory is fsynced. A crash during a save leaves the previous checkpoint intact.
* :func:`load_latest` walks the checkpoints newest first and falls back, with a warning, past
  any file that is truncated or corrupt.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "checkpoint_paths",
    "load_checkpoint",
    "load_latest",
    "save_checkpoint",
]

_NAME = re.compile(r"^epoch-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupt, or not a checkpoint)."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, flush, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is truncated, corrupt, or holds something other than a
            checkpoint dict (the message names the file).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict")
    return state


def checkpoint_paths(directory: str | os.PathLike) -> list[Path]:
    """The ``epoch-N.pt`` files in ``directory``, newest (largest N) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def load_latest(
    directory: str | os.PathLike, map_location: Any = "cpu"
) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint in ``directory`` and its path; ``None`` if there is none.

    Unreadable files are skipped with a warning naming them (the previous good one is used).
    """
    for path in checkpoint_paths(directory):
        try:
            return load_checkpoint(path, map_location), path
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to an older checkpoint", RuntimeWarning, stacklevel=2)
    return None


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
