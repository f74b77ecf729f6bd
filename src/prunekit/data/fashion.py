"""Fashion-MNIST: fetched from the Debian package ``dataset-fashion-mnist`` and loaded from its idx files.

``apt-get download`` puts the .deb into a temporary directory (nothing is installed system-wide). The .deb is read
in Python (an ``ar`` archive whose ``data.tar.*`` member holds ``usr/share/datasets/fashion-mnist/``), only the four
original idx ``.gz`` files are taken, each checked against a pinned sha256 and written atomically to
``<data dir>/fashion_mnist/``. Licence: MIT (Zalando SE, 2017).
"""
from __future__ import annotations

import gzip
import io
import os
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import DatasetMissingError, PrunekitError
from .fetch import have_verified, local_copy, one_file, run_tool, write_verified
from .paths import DATA_ENV, data_dir

#: The Debian package that carries Fashion-MNIST (version observed: 0.0~git20200523.55506a9-1, 30.9 MB).
FASHION_PACKAGE = "dataset-fashion-mnist"
#: Folder of the idx files inside the package.
FASHION_PKG_DIR = PurePosixPath("usr/share/datasets/fashion-mnist")
#: Where Fashion-MNIST lives, relative to the data directory.
FASHION_RELDIR = Path("fashion_mnist")
#: The four original files and their sha256.
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
#: Per-channel statistics of the 60k training images in [0, 1].
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
#: Default validation hold-out (stratified, seeded) from the 60k training images.
FASHION_VAL_SIZE = 10000
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")

_HINT = "the package is corrupt or not the original dataset-fashion-mnist; fetch it again"
_OFFLINE = f"download {FASHION_PACKAGE}_*.deb elsewhere and pass it with --wheel FILE"
_IDX_TYPES = {0x08: np.uint8}


def _deb_data_tar(deb: Path) -> bytes:
    """The bytes of the ``data.tar.*`` member of the ar archive ``deb``."""
    try:
        with open(deb, "rb") as fh:
            if fh.read(8) != b"!<arch>\n":
                raise PrunekitError(f"{deb} is not a Debian package (no ar header): pass {FASHION_PACKAGE}_*.deb")
            while True:
                head = fh.read(60)
                if len(head) < 60:
                    break
                name = head[:16].decode("ascii", "replace").strip().rstrip("/")
                size = int(head[48:58].decode("ascii").strip())
                if name.startswith("data.tar"):
                    blob = fh.read(size)
                    if len(blob) != size:
                        break
                    return blob
                fh.seek(size + (size & 1), os.SEEK_CUR)
    except (OSError, ValueError) as exc:
        raise PrunekitError(f"{deb} is not a readable Debian package ({exc}): pass {FASHION_PACKAGE}_*.deb") from exc
    raise PrunekitError(f"{deb} has no complete data.tar member: pass the original {FASHION_PACKAGE}_*.deb")


def _extract(deb: Path, folder: Path) -> None:
    blob = _deb_data_tar(deb)
    done = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tf:
            for info in tf:
                rel = PurePosixPath(info.name.lstrip("./"))
                if info.isfile() and rel.parent == FASHION_PKG_DIR and rel.name in FASHION_FILES:
                    src = tf.extractfile(info)
                    write_verified(src, folder / rel.name, FASHION_FILES[rel.name], f"{rel.name} in {deb}", _HINT)
                    done.add(rel.name)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise PrunekitError(f"{deb} has an unreadable data archive ({exc}): {_HINT}") from exc
    missing = sorted(set(FASHION_FILES) - done)
    if missing:
        raise PrunekitError(f"{deb} has no {FASHION_PKG_DIR}/{missing[0]}: pass the original {FASHION_PACKAGE}_*.deb")


def fetch_fashion_mnist(root: str | os.PathLike | None = None, package: str | os.PathLike | None = None,
                        force: bool = False) -> Path:
    """Put the four Fashion-MNIST idx files into ``<data dir>/fashion_mnist/`` and return that folder.

    Does nothing when they are there with the right sha256 (unless ``force``). ``package``: a local
    ``dataset-fashion-mnist_*.deb`` (offline); without it ``apt-get download`` fetches it into a temporary
    directory (if apt does not know the package, run ``apt-get update`` first).
    """
    folder = data_dir(root) / FASHION_RELDIR
    if not force and have_verified((folder / n, h) for n, h in FASHION_FILES.items()):
        return folder
    if package is not None:
        _extract(local_copy(package, f"{FASHION_PACKAGE}_*.deb"), folder)
        return folder
    with tempfile.TemporaryDirectory(prefix="prunekit-fashion-") as tmp:
        run_tool(["apt-get", "download", FASHION_PACKAGE], tmp, f"apt-get download {FASHION_PACKAGE}",
                 f"run `apt-get update` if apt does not know the package, check the network, or {_OFFLINE}")
        _extract(one_file(tmp, f"{FASHION_PACKAGE}_*.deb", FASHION_PACKAGE, _OFFLINE), folder)
    return folder


def read_idx(data: bytes, source: str) -> np.ndarray:
    """Parse an idx file (magic ``0 0 type ndim``, ``ndim`` big-endian uint32 sizes, then the values)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise PrunekitError(f"{source} is not an idx file (bad magic): fetch it again")
    dtype, ndim = _IDX_TYPES.get(data[2]), data[3]
    if dtype is None:
        raise PrunekitError(f"{source} has idx type 0x{data[2]:02x}, expected unsigned bytes (0x08): fetch it again")
    if len(data) < 4 + 4 * ndim:
        raise PrunekitError(f"{source} is truncated (no room for its {ndim} sizes): fetch it again")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    n = int(np.prod(shape, dtype=np.int64))
    if len(data) - 4 - 4 * ndim != n:
        raise PrunekitError(f"{source} holds {len(data) - 4 - 4 * ndim} values but its header says {shape}: "
                            f"fetch it again")
    return np.frombuffer(data, dtype=dtype, count=n, offset=4 + 4 * ndim).reshape(shape)


def _read_split(folder: Path, prefix: str):
    images, labels = (folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz")
    try:
        x = read_idx(gzip.decompress(images.read_bytes()), str(images))
        y = read_idx(gzip.decompress(labels.read_bytes()), str(labels))
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise PrunekitError(f"{folder} holds a corrupt file ({exc}): fetch it again with `prunekit data fetch "
                            f"fashion_mnist --force`") from exc
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
        raise PrunekitError(f"{images} has shape {x.shape} and {labels} {y.shape}, expected [n, 28, 28] and [n]: "
                            f"fetch again with `prunekit data fetch fashion_mnist --force`")
    if y.size and y.max() >= 10:
        raise PrunekitError(f"{labels} has labels outside 0..9: fetch again with `prunekit data fetch fashion_mnist "
                            f"--force`")
    return torch.from_numpy(x.reshape(-1, 1, 28, 28).copy()), torch.from_numpy(y.astype(np.int64))


def load_fashion_mnist(root: Path, val_size, seed: int):
    """Train / val / test splits of Fashion-MNIST from ``root/fashion_mnist`` (uint8 images, scale 255).

    The 10k test set is the original one; ``val_size`` (default 10,000) images are held out of the 60k training set
    by a stratified, seeded split (``seed``), leaving 50,000 for training.
    """
    from .datasets import DatasetSplits, TensorData, holdout

    folder = root / FASHION_RELDIR
    missing = [n for n in FASHION_FILES if not (folder / n).is_file()]
    if missing:
        raise DatasetMissingError(f"Fashion-MNIST is not in {root} ({missing[0]} missing): run `prunekit data fetch "
                                  f"fashion_mnist` (add --data-dir DIR, or set {DATA_ENV}, to use another data "
                                  f"directory)")
    train = TensorData(*_read_split(folder, "train"), 255.0)
    test = TensorData(*_read_split(folder, "t10k"), 255.0)
    train, val = holdout(train, FASHION_VAL_SIZE if val_size is None else val_size, seed, "fashion_mnist")
    return DatasetSplits(train, val, test, "fashion_mnist", (1, 28, 28), 10, FASHION_MEAN, FASHION_STD,
                         augment=False)
