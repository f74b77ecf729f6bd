"""Atomic file writes: a crash never leaves a half-written file behind."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from . import distributed
from .errors import PrunekitError

import torch


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it into place; on any exception the
    temporary file is removed and ``path`` is untouched.

    Under DDP (:mod:`prunekit.distributed`) only rank 0 writes: on the other ranks this returns ``path`` without
    writing (checkpoints, run records and archives are written once, by one process)."""
    path = Path(path)
    if not distributed.is_main():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        _raise_plain(e, path)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        _raise_plain(e, path)
        raise
    return path


def _raise_plain(e: BaseException, path: Path) -> None:
    """Raise a disk-full, read-only or permission error as a one-line :class:`WriteError` naming ``path``; return
    for any other exception (the caller re-raises it)."""
    if isinstance(e, OSError) and e.errno in _PLAIN_CAUSES:
        raise WriteError(f"cannot write {path}: {_PLAIN_CAUSES[e.errno]}; nothing was changed (the previous file, "
                         "if any, is intact)") from e


class WriteError(PrunekitError):
    """A file could not be written for a reason the user must fix (disk full, read-only, permission)."""


_PLAIN_CAUSES = {
    errno.ENOSPC: "the disk is full (ENOSPC): free some space and run the same command again",
    errno.EDQUOT: "the disk quota is exceeded (EDQUOT): free some space and run the same command again",
    errno.EROFS: "the file system is read-only (EROFS): point --root at a writable folder",
    errno.EACCES: "permission denied (EACCES): make the folder writable or point --root elsewhere",
}


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class RunBusyError(PrunekitError):
    """Another process holds the run's lock (it is running it now)."""


def acquire_lock(path: str | os.PathLike):
    """Take an exclusive, non-blocking lock on ``path`` (created if needed); returns the open file that holds it.

    The lock goes with the process: if it dies, the lock is released. Raises :class:`RunBusyError` when another
    process holds it. Release with :func:`release_lock`. On systems without ``fcntl`` no lock is taken.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RunBusyError(f"{path.parent.name} is being run by another process (lock {path}); wait for it, or "
                           "stop that process") from None
    return f


def release_lock(f) -> None:
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except (ImportError, OSError):  # pragma: no cover
        pass
    f.close()
