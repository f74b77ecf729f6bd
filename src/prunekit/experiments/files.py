"""Report files (plots, exported tables): written atomically, with the permissions of a normally created file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..io import atomic_write


def write_shared(path: str | os.PathLike, write: Callable) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path`` and rename it into place
    (:func:`prunekit.io.atomic_write`); the file then gets the permissions the umask gives a new file (the
    temporary file was private)."""
    path = atomic_write(path, write)
    if path.exists():  # under DDP only rank 0 writes
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(path, 0o666 & ~mask)
    return path
