"""In-memory datasets: MNIST, CIFAR-10/100 (from the standard python archives) and a synthetic task for tests.

Everything is held as plain tensors. Images are stored compactly (``uint8`` for MNIST and CIFAR) together with the
``scale`` that maps them back to float inputs in [0, 1]; :class:`~prunekit.data.loader.TensorLoader` does that
conversion (and augmentation / normalization) per batch.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import torch

from ..errors import DatasetMissingError, PrunekitError, unknown
from ._util import check_seed, generator, safe_unpickle
from .fetch import CIFAR_ARCHIVES, MNIST_RELPATH, cifar_missing_message, normalize_name
from .paths import DATA_ENV, data_dir

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

#: Default size of the validation hold-out carved out of the CIFAR training split.
CIFAR_VAL_SIZE = 5000

SYNTHETIC_DEFAULTS = dict(n_train=512, n_val=128, n_test=128, input_shape=(1, 8, 8), num_classes=4, seed=0,
                          noise=1.0, class_sep=1.0)

_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "synthetic", "imagenet")


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(_DATASETS)


# ----------------------------------------------------------------------------------------------------------------
# containers


@dataclass(repr=False)
class TensorData:
    """Inputs ``x`` (first dim = samples) and int64 labels ``y``.

    ``scale``: dividing raw ``x`` by it gives float inputs in [0, 1] (``None``: 255 for integer ``x``, 1 for float).
    """

    x: torch.Tensor
    y: torch.Tensor
    scale: float | None = None

    def __post_init__(self):
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise PrunekitError("TensorData needs tensors for x and y: convert with torch.as_tensor")
        if self.y.dtype != torch.int64:
            if self.y.dtype.is_floating_point or self.y.dtype == torch.bool:
                raise PrunekitError(f"labels must be integers, got {self.y.dtype}: pass class indices as int64")
            self.y = self.y.long()
        if self.y.dim() != 1 or self.x.dim() == 0 or self.x.shape[0] != self.y.shape[0]:
            raise PrunekitError(f"x has {self.x.shape[0] if self.x.dim() else 0} samples but y has shape "
                                f"{tuple(self.y.shape)}: pass one label per sample")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def input_scale(self) -> float:
        if self.scale is not None:
            return float(self.scale)
        return 1.0 if self.x.dtype.is_floating_point else 255.0

    def inputs(self) -> torch.Tensor:
        """All inputs as float32 in the [0, 1] scale (no normalization)."""
        x = self.x.float()
        return x / self.input_scale if self.input_scale != 1.0 else x

    def subset(self, idx: torch.Tensor) -> "TensorData":
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.x.device)
        return TensorData(self.x.index_select(0, idx), self.y.index_select(0, idx.to(self.y.device)), self.scale)

    def __repr__(self) -> str:
        return (f"TensorData(n={len(self)}, x={tuple(self.x.shape)} {str(self.x.dtype).replace('torch.', '')}, "
                f"scale={self.input_scale:g}, device={self.x.device})")


@dataclass(repr=False)
class DatasetSplits:
    """Train / validation / test splits plus what a model and a loader need to know about them."""

    train: TensorData
    val: TensorData
    test: TensorData
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False  # default for the training loader: crop + flip for CIFAR, off otherwise

    def __repr__(self) -> str:
        return (f"DatasetSplits({self.name!r}, train={len(self.train)}, val={len(self.val)}, test={len(self.test)}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes}, augment={self.augment})")


# ----------------------------------------------------------------------------------------------------------------
# deterministic index selection


def _labels(y) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise PrunekitError(f"labels must be a 1-D integer tensor, got {tuple(y.shape)} {y.dtype}: pass class "
                            f"indices")
    return y.detach().to("cpu", torch.long)


def _count(value, what: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PrunekitError(f"{what} must be an integer, got {value!r}: pass a whole number >= {low}")
    if value < low:
        raise PrunekitError(f"{what} must be >= {low}, got {value}: pass a larger number")
    return int(value)


def _pick_per_class(y: torch.Tensor, wanted: dict[int, int], g: torch.Generator | None) -> torch.Tensor:
    """Indices of ``wanted[c]`` samples of each class ``c`` (random if ``g`` else the first ones), sorted."""
    parts = []
    for c in sorted(wanted):
        idx = torch.nonzero(y == c).flatten()
        if g is not None:
            idx = idx[torch.randperm(idx.numel(), generator=g)]
        parts.append(idx[: wanted[c]])
    out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return torch.sort(out).values


def stratified_split(y, n_holdout: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(len(y))`` into (train_idx, holdout_idx), both sorted int64, with ``n_holdout`` samples held out.

    Each class gets its proportional share of the hold-out (largest-remainder rounding, ties to the lower class
    id); which samples of a class are held out is random but a deterministic function of ``seed``.
    """
    y = _labels(y)
    n = y.numel()
    n_holdout = _count(n_holdout, "n_holdout")
    if n_holdout > n:
        raise PrunekitError(f"cannot hold out {n_holdout} of {n} samples: pass a smaller validation size")
    g = generator(check_seed(seed), 0x5EED)
    classes, counts = torch.unique(y, return_counts=True)
    share = counts * n_holdout
    alloc = share // max(n, 1)
    left = n_holdout - int(alloc.sum())
    if left:
        rem = share % max(n, 1)
        order = torch.sort(-rem, stable=True).indices  # largest remainder first, ties by class id
        alloc[order[:left]] += 1
    hold = _pick_per_class(y, {int(c): int(k) for c, k in zip(classes, alloc)}, g)
    mask = torch.ones(n, dtype=torch.bool)
    mask[hold] = False
    return torch.nonzero(mask).flatten(), hold


_PICKS = ("random", "first")


def _balanced(y: torch.Tensor, wanted: dict[int, int], seed: int, pick: str) -> torch.Tensor:
    if pick not in _PICKS:
        raise unknown("pick", str(pick), _PICKS)
    classes, counts = torch.unique(y, return_counts=True)
    have = dict(zip(classes.tolist(), counts.tolist()))
    for c, k in wanted.items():
        if have.get(c, 0) < k:
            raise PrunekitError(f"class {c} has only {have.get(c, 0)} samples but {k} were requested: ask for "
                                f"at most {min(have.values()) if have else 0} per class")
    g = generator(check_seed(seed), 0xBA1A) if pick == "random" else None
    return _pick_per_class(y, wanted, g)


def balanced_subset(y, per_class: int, seed: int = 0, pick: str = "random") -> torch.Tensor:
    """Sorted indices of ``per_class`` samples of every class present in ``y``.

    ``pick='random'``: a seeded random choice within each class; ``'first'``: the first ``per_class`` samples of
    each class in dataset order. Raises if a class has fewer than ``per_class`` samples.
    """
    y = _labels(y)
    per_class = _count(per_class, "per_class", 1)
    return _balanced(y, {int(c): per_class for c in torch.unique(y)}, seed, pick)


def random_subset(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` distinct indices out of ``range(n)``, chosen by ``seed``, sorted."""
    n, k = _count(n, "n"), _count(k, "k")
    if k > n:
        raise PrunekitError(f"cannot pick {k} of {n} samples: pass k <= {n}")
    g = generator(check_seed(seed), 0x5AB5)
    return torch.sort(torch.randperm(n, generator=g)[:k]).values


def _subset_total(y: torch.Tensor, total: int, seed: int) -> torch.Tensor:
    """A class-balanced subset of ``total`` samples: ``total // C`` per class, one extra for the lowest class ids."""
    classes = torch.unique(y).tolist()
    if total < len(classes):
        raise PrunekitError(f"subset={total} is smaller than the {len(classes)} classes: pass subset >= "
                            f"{len(classes)}")
    base, extra = divmod(total, len(classes))
    wanted = {c: base + (i < extra) for i, c in enumerate(classes)}
    counts = dict(zip(*[t.tolist() for t in torch.unique(y, return_counts=True)]))
    short = [c for c in classes if counts[c] < wanted[c]]
    if short:
        raise PrunekitError(f"subset={total} needs {wanted[short[0]]} samples of class {short[0]} but it has "
                            f"{counts[short[0]]}: pass a smaller subset")
    return _balanced(y, wanted, seed, "random")


# ----------------------------------------------------------------------------------------------------------------
# loading


def val_count(val_size, n: int, name: str) -> int:
    ok = (not isinstance(val_size, bool) and isinstance(val_size, (int, float, np.integer, np.floating))
          and math.isfinite(val_size) and val_size >= 0 and (val_size < 1 or float(val_size).is_integer()))
    if not ok:
        raise PrunekitError(f"val_size={val_size!r} is invalid for {name}: pass a count >= 0 like 5000 or a "
                            f"fraction in (0, 1) like 0.1")
    k = int(round(float(val_size) * n)) if 0 < val_size < 1 else int(val_size)
    if k >= n:
        raise PrunekitError(f"val_size={val_size!r} would leave no training data ({n} samples in {name}): pass "
                            f"a smaller val_size")
    return k


def holdout(train: TensorData, val_size, seed: int, name: str) -> tuple[TensorData, TensorData]:
    k = val_count(val_size, len(train), name)
    tr, va = stratified_split(train.y, k, seed)
    return train.subset(tr), train.subset(va)


def _to_images(x: np.ndarray, what: str) -> tuple[torch.Tensor, float]:
    """MNIST rows [n, 784] float in [0,1) -> [n,1,28,28]; uint8 with scale 256 when lossless, else float32."""
    x = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)
    raw = x * np.float32(256.0)  # exact: power of two
    if raw.size and (x.min() < 0 or raw.max() > 255):
        return torch.from_numpy(np.ascontiguousarray(x)), 1.0
    u8 = raw.astype(np.uint8)
    if np.array_equal(u8, raw):
        return torch.from_numpy(u8), 256.0
    return torch.from_numpy(np.ascontiguousarray(x)), 1.0


def _load_mnist(root: Path, val_size, seed: int) -> DatasetSplits:
    path = root / MNIST_RELPATH
    if not path.is_file():
        raise DatasetMissingError(f"MNIST is not in {root}: run `prunekit data fetch mnist` (add --data-dir DIR, "
                                  f"or set {DATA_ENV}, to use another data directory)")
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
        obj = safe_unpickle(raw, encoding="latin1", source=str(path))
        del raw
        splits = []
        for xs, ys in obj:
            x, scale = _to_images(xs, str(path))
            y = torch.from_numpy(np.asarray(ys, dtype=np.int64))
            splits.append(TensorData(x, y, scale))
        if len(splits) != 3:
            raise ValueError(f"expected 3 splits, found {len(splits)}")
    except PrunekitError:
        raise
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError, zlib.error) as exc:
        raise PrunekitError(f"{path} is corrupt ({exc}): fetch it again with `prunekit data fetch mnist "
                            f"--force`") from exc
    train, val, test = splits
    if val_size is not None:  # pool the file's train+val (the original 60k) and hold out val_size of it
        pooled = TensorData(torch.cat([train.x, val.x]), torch.cat([train.y, val.y]),
                            train.scale if train.scale == val.scale else None)
        train, val = holdout(pooled, val_size, seed, "mnist")
    return DatasetSplits(train, val, test, "mnist", (1, 28, 28), 10, MNIST_MEAN, MNIST_STD, augment=False)


_CIFAR_MEMBERS = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": (["train"], ["test"], b"fine_labels", 100),
}


def _cifar_raw(root: Path, key: str) -> tuple[dict[str, bytes], str]:
    """The pickled members of a CIFAR archive, from the extracted folder or straight from the tarball."""
    title, tarball, folder = CIFAR_ARCHIVES[key]
    train_m, test_m, _, _ = _CIFAR_MEMBERS[key]
    members = train_m + test_m
    fdir, tpath = root / folder, root / tarball
    if fdir.is_dir():
        missing = [m for m in members if not (fdir / m).is_file()]
        if missing:
            raise DatasetMissingError(f"{fdir} lacks {', '.join(missing)}: extract the complete {tarball} there, "
                                      f"or remove the folder and put {tarball} into {root}")
        return {m: (fdir / m).read_bytes() for m in members}, str(fdir)
    if tpath.is_file():
        found: dict[str, bytes] = {}
        try:
            with tarfile.open(tpath, "r|*") as tf:  # one sequential pass, no extraction
                for info in tf:
                    parts = PurePosixPath(info.name).parts
                    if info.isfile() and len(parts) >= 2 and parts[-2] == folder and parts[-1] in members:
                        found[parts[-1]] = tf.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise PrunekitError(f"{tpath} is not a readable tar.gz ({exc}): replace it with the original "
                                f"{tarball}") from exc
        missing = [m for m in members if m not in found]
        if missing:
            raise PrunekitError(f"{tpath} has no {folder}/{missing[0]}: replace it with the original {tarball}")
        return found, str(tpath)
    raise DatasetMissingError(cifar_missing_message(key, root))


def _cifar_batch(blob: bytes, source: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = safe_unpickle(blob, encoding="bytes", source=source)
        data = np.asarray(d[b"data"])
        labels = np.asarray(d[label_key], dtype=np.int64)
    except PrunekitError:
        raise
    except (KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError, IndexError) as exc:
        raise PrunekitError(f"{source} is not a CIFAR python batch ({type(exc).__name__}: {exc}): replace it "
                            f"with the original archive") from exc
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise PrunekitError(f"{source} has data {data.shape} {data.dtype} and {labels.shape[0]} labels, expected "
                            f"uint8 [n, 3072] and n labels: replace it with the original archive")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise PrunekitError(f"{source} has labels outside 0..{num_classes - 1}: replace it with the original "
                            f"archive")
    return data, labels


def _load_cifar(root: Path, key: str, val_size, seed: int) -> DatasetSplits:
    train_m, test_m, label_key, num_classes = _CIFAR_MEMBERS[key]
    blobs, source = _cifar_raw(root, key)

    def merge(names: Sequence[str]) -> TensorData:
        xs, ys = zip(*(_cifar_batch(blobs.pop(m), f"{source}:{m}", label_key, num_classes) for m in names))
        x = np.concatenate(xs) if len(xs) > 1 else xs[0]
        # rows are 1024 red, 1024 green, 1024 blue bytes, each a 32x32 image in row-major order
        x = torch.from_numpy(np.ascontiguousarray(x).reshape(-1, 3, 32, 32))
        return TensorData(x, torch.from_numpy(np.concatenate(ys)), 255.0)

    train, test = merge(train_m), merge(test_m)
    train, val = holdout(train, CIFAR_VAL_SIZE if val_size is None else val_size, seed, key)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if key == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return DatasetSplits(train, val, test, key, (3, 32, 32), num_classes, mean, std, augment=True)


def _synthetic(val_size, options: dict) -> DatasetSplits:
    unknown_opts = sorted(set(options) - set(SYNTHETIC_DEFAULTS))
    if unknown_opts:
        raise unknown("synthetic option", unknown_opts[0], SYNTHETIC_DEFAULTS)
    o = {**SYNTHETIC_DEFAULTS, **options}
    if val_size is not None:
        if "n_val" in options and options["n_val"] != val_size:
            raise PrunekitError(f"val_size={val_size!r} and n_val={options['n_val']!r} disagree for 'synthetic': "
                                f"pass only one of them")
        o["n_val"] = val_size
    n_train = _count(o["n_train"], "n_train", 1)
    n_val, n_test = _count(o["n_val"], "n_val"), _count(o["n_test"], "n_test")
    num_classes = _count(o["num_classes"], "num_classes", 2)
    seed = check_seed(o["seed"])
    shape = o["input_shape"]
    if (not isinstance(shape, (tuple, list)) or len(shape) != 3
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise PrunekitError(f"input_shape={shape!r} is invalid: pass three positive integers (C, H, W) like "
                            f"(1, 8, 8)")
    shape = tuple(int(s) for s in shape)
    noise, sep = o["noise"], o["class_sep"]
    for what, v in (("noise", noise), ("class_sep", sep)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise PrunekitError(f"{what}={v!r} is invalid: pass a non-negative number")
    # every class is a fixed random pattern; samples are that pattern plus Gaussian noise
    patterns = torch.randn((num_classes, *shape), generator=generator(seed, 0)) * float(sep)

    def make(n: int, stream: int) -> TensorData:
        g = generator(seed, stream)
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        x = patterns[y] + float(noise) * torch.randn((n, *shape), generator=g)
        return TensorData(x.float(), y, 1.0)

    c = shape[0]
    spread = math.sqrt(float(sep) ** 2 + float(noise) ** 2) or 1.0
    return DatasetSplits(make(n_train, 1), make(n_val, 2), make(n_test, 3), "synthetic", shape, num_classes,
                         (0.0,) * c, (spread,) * c, augment=False)


def load_dataset(name: str, root: str | os.PathLike | None = None, val_size: int | float | None = None,
                 split_seed: int = 42, subset: int | None = None, **options) -> DatasetSplits:
    """Load dataset ``name`` ('mnist', 'fashion_mnist', 'cifar10', 'cifar100' or 'synthetic') from the data
    directory.

    ``val_size``: size of the validation split, a count or a fraction of the training split. ``None`` means the
    dataset's default: the file's own 10k validation set for MNIST (an explicit value instead holds out a stratified
    sample of the pooled 60k train+val), a stratified hold-out of 10,000 of the 60k training images for
    Fashion-MNIST (50k/10k/10k), a stratified hold-out of 5000 training images for CIFAR, ``n_val`` for
    synthetic. ``split_seed`` fixes which samples are held out. ``subset``: keep only a class-balanced, seeded
    subset of that many training samples (quick runs). ``options`` configure 'synthetic' (n_train, n_val, n_test,
    input_shape, num_classes, seed, noise, class_sep); other datasets take none.
    """
    key = normalize_name(name)
    if key not in {normalize_name(n) for n in _DATASETS}:
        raise unknown("dataset", str(name), dataset_names())
    if key not in ("synthetic", "imagenet") and options:
        raise PrunekitError(f"dataset {key!r} takes no option {sorted(options)[0]!r}: options such as n_train "
                            f"only apply to 'synthetic'")
    split_seed = check_seed(split_seed, "split_seed")
    if key == "synthetic":
        splits = _synthetic(val_size, options)
    elif key == "imagenet":  # files decoded on the fly: see prunekit.data.imagenet
        from .imagenet import load_imagenet

        splits = load_imagenet(data_dir(root), val_size, split_seed, **options)
    elif key == "mnist":
        splits = _load_mnist(data_dir(root), val_size, split_seed)
    elif key == "fashionmnist":
        from .fashion import load_fashion_mnist

        splits = load_fashion_mnist(data_dir(root), val_size, split_seed)
    else:
        splits = _load_cifar(data_dir(root), key, val_size, split_seed)
    if subset is not None:
        total = _count(subset, "subset", 1)
        if total > len(splits.train):
            raise PrunekitError(f"subset={total} exceeds the {len(splits.train)} training samples of {key}: pass a "
                                f"smaller subset or leave it out")
        splits.train = splits.train.subset(_subset_total(splits.train.y, total, split_seed))
    return splits


def resized(splits: DatasetSplits, size: int) -> DatasetSplits:
    """``splits`` with every image resized to ``size`` x ``size`` (bilinear, in the [0, 1] scale, float32).

    For models that need a larger input than the data (VGG's five poolings need 32 px; seed 001 resizes MNIST).
    """
    import dataclasses

    import torch.nn.functional as F

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise PrunekitError(f"resize must be a positive whole number of pixels, got {size!r}")
    if not isinstance(splits.train, TensorData) or splits.train.x.dim() != 4:
        raise PrunekitError(f"resize needs in-memory images [n, C, H, W]; {splits.name} has none")

    def one(d: TensorData) -> TensorData:
        x = F.interpolate(d.inputs(), size=(size, size), mode="bilinear", align_corners=False)
        return TensorData(x, d.y, 1.0)

    c = splits.input_shape[0]
    return dataclasses.replace(splits, train=one(splits.train), val=one(splits.val), test=one(splits.test),
                               input_shape=(c, size, size))


def with_channels(splits: DatasetSplits, channels: int) -> DatasetSplits:
    """``splits`` of one-channel images repeated to ``channels`` channels (grayscale data for an RGB model such as
    an ImageNet-pretrained CNN). The copies are views: no extra memory until a batch is formed."""
    import dataclasses

    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise PrunekitError(f"channels must be a positive whole number, got {channels!r}")
    c = splits.input_shape[0] if len(splits.input_shape) == 3 else None
    if c == channels:
        return splits
    if c != 1 or not isinstance(splits.train, TensorData) or splits.train.x.dim() != 4:
        raise PrunekitError(f"channels={channels} repeats one-channel images; {splits.name} has input shape "
                            f"{tuple(splits.input_shape)}: leave data.channels out")

    def one(d: TensorData) -> TensorData:
        return TensorData(d.x.expand(-1, channels, -1, -1), d.y, d.scale)

    return dataclasses.replace(splits, train=one(splits.train), val=one(splits.val), test=one(splits.test),
                               input_shape=(channels, *splits.input_shape[1:]), mean=splits.mean * channels
                               if len(splits.mean) == 1 else splits.mean,
                               std=splits.std * channels if len(splits.std) == 1 else splits.std)


def subset_test(splits: DatasetSplits, size: int, seed: int = 42) -> DatasetSplits:
    """``splits`` with a stratified, seeded subset of ``size`` test samples (quick evaluations of slow models; the
    run records the test set size it used)."""
    import dataclasses

    n = _count(size, "test_size", 1)
    if n >= len(splits.test):
        return splits
    _, keep = stratified_split(splits.test.y, n, seed + 3)
    return dataclasses.replace(splits, test=splits.test.subset(keep))
