"""Where prunekit keeps its datasets."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import PrunekitError

#: Environment variable that overrides the default data directory.
DATA_ENV = "PRUNEKIT_DATA"


def default_data_dir() -> Path:
    """``~/.cache/prunekit/data`` (not created)."""
    return Path("~/.cache/prunekit/data").expanduser()


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The data directory, created on demand.

    ``override`` if given, else the ``PRUNEKIT_DATA`` environment variable (when set and non-empty), else
    ``~/.cache/prunekit/data``.
    """
    if override is not None and str(override) != "":
        path, source = Path(override).expanduser(), "--data-dir"
    elif os.environ.get(DATA_ENV):
        path, source = Path(os.environ[DATA_ENV]).expanduser(), DATA_ENV
    else:
        path, source = default_data_dir(), "the default data directory"
    if path.exists() and not path.is_dir():
        raise PrunekitError(f"data directory {str(path)!r} (from {source}) is a file: point --data-dir or "
                            f"{DATA_ENV} at a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrunekitError(f"cannot create data directory {str(path)!r} (from {source}): {exc.strerror or exc}; "
                            f"point --data-dir or {DATA_ENV} at a writable directory") from exc
    return path
