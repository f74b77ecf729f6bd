"""Checked checkpoints: files a run resumes from carry their owner and a checksum, and load as data only.

A run trusts nothing it did not write itself, intact. Every resumable file of a run (``last.pt``, the IMP level
files, ``init.pt``, ``rewind.pt``) is written as::

    PRUNEKIT-CHECKPOINT/1\\n
    {"owner": "<run id>[/<sub-folder>]", "sha256": "<hex digest of the payload>", "size": <payload bytes>}\\n
    <payload: torch.save of plain containers and tensors>

atomically (:func:`prunekit.io.atomic_write`). :func:`load_checked` verifies the header, the size, the sha256 and
the owner before it unpickles anything, and then unpickles with ``torch.load(weights_only=True)``: a damaged,
truncated, empty or foreign file, or one that would need code to load, raises :class:`CheckpointError` naming the
file and the reason. The caller decides what that means: a run moves the file aside (:func:`quarantine`, never
deletes it) and restarts the work it held, or stops when the user asked it to (``--no-restart-corrupt``).

Nothing here is a security boundary on its own: ``weights_only=True`` is. The checksum and the owner catch bit rot,
truncation and files copied between runs, which unpickle fine and would otherwise give silently wrong results.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import PrunekitError
from .io import atomic_write, atomic_write_json

MAGIC = b"PRUNEKIT-CHECKPOINT/1\n"
_MAX_HEADER = 4096
ON_CORRUPT_ENV = "PRUNEKIT_ON_CORRUPT"  # 'restart' (default) or 'error'; the CLI's --no-restart-corrupt sets it


class CheckpointError(PrunekitError):
    """A checkpoint that must not be trusted: unreadable, damaged, truncated, foreign, or not plain data."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint was not trusted and was moved aside; the work it held is done again."""


def on_corrupt_policy(policy: str | None = None) -> str:
    """``restart`` or ``error``: what a run does with a checkpoint it cannot trust (``policy``, else the
    ``PRUNEKIT_ON_CORRUPT`` environment variable, else ``restart``)."""
    policy = (policy or os.environ.get(ON_CORRUPT_ENV) or "restart").strip().lower()
    if policy not in ("restart", "error"):
        raise PrunekitError(f"{ON_CORRUPT_ENV}={policy!r}: use 'restart' (move the file aside and redo its work) or "
                            "'error' (stop)")
    return policy


def plain(obj: Any) -> Any:
    """``obj`` with NumPy arrays and scalars turned into tensors and Python numbers, so that it loads with
    ``weights_only=True``."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def encode(obj: Any, owner: str | None) -> bytes:
    """The bytes of a checked checkpoint holding ``obj`` (see the module docstring)."""
    buf = io.BytesIO()
    torch.save(plain(obj), buf)
    payload = buf.getvalue()
    header = {"owner": owner, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def save_checked(obj: Any, path: str | os.PathLike, owner: str | None) -> Path:
    """Write ``obj`` to ``path`` as a checked checkpoint of ``owner`` (a run id, or run id + sub-folder),
    atomically."""
    data = encode(obj, owner)
    return atomic_write(path, lambda f: f.write(data))


def _header(path: Path, data: bytes) -> tuple[dict, bytes]:
    if not data:
        raise CheckpointError(path, "empty file (0 bytes)")
    if not data.startswith(MAGIC):
        raise CheckpointError(path, "no prunekit checkpoint header: damaged, or written by another program or by a "
                                    "prunekit older than checked checkpoints")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER)
    if end < 0:
        raise CheckpointError(path, "damaged checkpoint header (truncated?)")
    try:
        header = json.loads(data[len(MAGIC):end].decode())
        size, digest = int(header["size"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(path, "damaged checkpoint header") from None
    payload = data[end + 1:]
    if len(payload) != size:
        raise CheckpointError(path, f"truncated or padded: {len(payload)} payload bytes, the header says {size}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(path, "checksum mismatch: the file is damaged")
    return header, payload


def load_checked(path: str | os.PathLike, owner: str | None = None, *, map_location="cpu") -> Any:
    """Read a checked checkpoint; with ``owner``, it must be that run's (or sub-folder's) own.

    Raises :class:`CheckpointError` (the file and the reason) for a missing, unreadable, empty, truncated,
    damaged or foreign file, and for one whose payload is not plain data (``weights_only=True`` refuses it)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(path, f"cannot be read ({e.strerror or e})") from None
    header, payload = _header(path, data)
    if owner is not None and header.get("owner") != owner:
        raise CheckpointError(path, f"belongs to {header.get('owner')!r}, not to {owner!r} (copied from another "
                                    "run's folder?)")
    return load_plain(io.BytesIO(payload), path, map_location=map_location)


def load_plain(source, path: str | os.PathLike, *, map_location="cpu") -> Any:
    """``torch.load(source, weights_only=True)``: plain containers and tensors only, never code. Any failure is a
    :class:`CheckpointError` naming ``path`` (never with torch's advice to turn weights-only loading off)."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((ln.strip() for ln in first if "Unsupported global" in ln or "Unsupported operand" in ln), "")
        raise CheckpointError(path, "holds objects other than tensors and plain containers, which prunekit never "
                                    "loads (they could run code)" + (f" [{why}]" if why else "")) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, OSError, AttributeError,
            TypeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(path, f"not a readable PyTorch file ({first[:200]})") from None


def quarantine(path: str | os.PathLike) -> Path:
    """Move ``path`` aside to ``<path>.corrupt`` (``.corrupt.1``, ... when taken); never deletes anything.
    Returns the new path."""
    path = Path(path)
    dest = path.with_name(path.name + ".corrupt")
    n = 0
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.corrupt.{n}")
    os.replace(path, dest)
    return dest


def write_digest(path: str | os.PathLike, owner: str | None) -> Path:
    """Write ``<path>.sha256`` (owner and sha256 of the file) beside a file kept in a public format (``best.pt``
    is a :func:`prunekit.save` file that users load directly)."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return atomic_write_json(path.with_name(path.name + ".sha256"), {"owner": owner, "sha256": digest})


def verify_digest(path: str | os.PathLike, owner: str | None = None) -> None:
    """Check ``path`` against its ``.sha256`` file when there is one (files of older runs have none); raises
    :class:`CheckpointError` on a mismatch or a foreign owner."""
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    if not side.exists():
        return
    try:
        want = json.loads(side.read_text())
        digest = str(want["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(side, "damaged checksum file") from None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(path, f"cannot be read ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(path, f"checksum mismatch with {side.name}: the file is damaged")
    if owner is not None and want.get("owner") not in (None, owner):
        raise CheckpointError(path, f"belongs to {want.get('owner')!r}, not to {owner!r}")


def sub_owner(run_dir: str | os.PathLike, folder: str | os.PathLike) -> str:
    """The owner of checkpoints in ``folder`` inside the run folder ``run_dir``: ``<run id>/<relative path>``."""
    run_dir, folder = Path(run_dir), Path(folder)
    return f"{run_dir.name}/{folder.relative_to(run_dir).as_posix()}"
