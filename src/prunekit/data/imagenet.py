"""ImageNet (ILSVRC-2012) from the standard ImageFolder layout, decoded from disk batch by batch.

Layout: ``<data dir>/imagenet/train/<wnid>/*.JPEG`` and ``<data dir>/imagenet/val/<wnid>/*.JPEG`` (the validation
images sorted into class folders, as torchvision's ImageFolder expects). Class ``i`` is the ``i``-th wnid of the
training folder in sorted order. Splits: a stratified hold-out of ``val_size`` training images (default 10,000) is
the validation split; the official ``val`` folder is the test split.

ImageNet does not fit in memory, so the splits hold :class:`FileData` (file paths and labels) instead of
:class:`~prunekit.data.datasets.TensorData`; :func:`prunekit.data.loaders` and :func:`prunekit.data.scoring_data`
hand them to :class:`FileLoader`, which decodes JPEGs with Pillow in ``torch.utils.data.DataLoader`` workers.
Transforms as torchvision's reference recipe: RandomResizedCrop(224, scale (0.08, 1), ratio (3/4, 4/3)) and a
horizontal flip for training, Resize(256) + CenterCrop(224) for evaluation (bilinear), then the ImageNet mean/std.
The shuffle order and every random crop and flip depend only on (seed, epoch, sample), not on the worker count.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import DatasetMissingError, PrunekitError, is_count
from ._util import check_seed, generator, mix_seed
from .datasets import DatasetSplits, val_count, stratified_split
from .paths import DATA_ENV

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_VAL_SIZE = 10000
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")

#: Options of ``load_dataset('imagenet', ..., **options)``; configs use these defaults (tests shrink them).
DEFAULTS = dict(image_size=224, resize_size=256, workers=None)  # workers None: min(8, CPU count)

_ORDER_STREAM, _AUG_STREAM = 0x0DE5, 0xA06E


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise PrunekitError("ImageNet needs Pillow to decode JPEGs: `pip install pillow`") from None
    return Image


@dataclass(repr=False)
class FileData:
    """Image files ``paths`` with int64 labels ``y``, plus how to turn them into ``image_size`` square inputs."""

    paths: list[str]
    y: torch.Tensor
    image_size: int = 224
    resize_size: int = 256
    workers: int = 0
    classes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.y = torch.as_tensor(self.y, dtype=torch.long)
        if self.y.dim() != 1 or len(self.paths) != self.y.numel():
            raise PrunekitError(f"FileData has {len(self.paths)} paths but labels of shape {tuple(self.y.shape)}: "
                                f"pass one label per file")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx) -> "FileData":
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        return FileData([self.paths[i] for i in idx.tolist()], self.y.index_select(0, idx), self.image_size,
                        self.resize_size, self.workers, self.classes)

    def __repr__(self) -> str:
        return f"FileData(n={len(self)}, image_size={self.image_size}, classes={len(self.classes)})"


# ----------------------------------------------------------------------------------------------------------------
# transforms (PIL), each a deterministic function of the image and a numpy generator


def _random_resized_box(w: int, h: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(left, top, width, height) of a RandomResizedCrop window, drawn as torchvision does (10 tries, then centre)."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def _train_image(img, size: int, rng: np.random.Generator):
    Image = _pil()
    left, top, cw, ch = _random_resized_box(img.width, img.height, rng)
    out = img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    if rng.uniform() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def _eval_image(img, size: int, resize: int):
    Image = _pil()
    w, h = img.size
    if w <= h:  # shorter side to ``resize``, keeping the aspect ratio (torchvision's Resize(int))
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    img = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    if nh < size or nw < size:
        raise PrunekitError(f"resize_size={resize} is smaller than image_size={size}: pass resize_size >= image_size")
    return img.crop((left, top, left + size, top + size))


class _ImageSet(torch.utils.data.Dataset):
    """Map-style dataset whose keys are (sample index, epoch); returns (uint8 [3, S, S], label)."""

    def __init__(self, data: FileData, augment: bool, seed: int):
        self.paths, self.y, self.augment, self.seed = data.paths, data.y, augment, seed
        self.size, self.resize = data.image_size, data.resize_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        i, epoch = key
        Image = _pil()
        try:
            with Image.open(self.paths[i]) as f:
                img = f.convert("RGB")
        except OSError as exc:
            raise PrunekitError(f"cannot read image {self.paths[i]} ({exc}): replace or remove the file") from None
        if self.augment:
            img = _train_image(img, self.size, np.random.default_rng(mix_seed(self.seed, epoch, _AUG_STREAM, i)))
        else:
            img = _eval_image(img, self.size, self.resize)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return x, self.y[i]


class _Keys(torch.utils.data.Sampler):
    """(index, epoch) keys of the loader's current epoch, in its (seeded) order."""

    def __init__(self, loader: "FileLoader"):
        self.loader = loader

    def __len__(self) -> int:
        return self.loader.num_samples

    def __iter__(self):
        ld = self.loader
        epoch, n = ld._pass_epoch, len(ld.data)
        order = (torch.randperm(n, generator=generator(ld.seed, epoch, _ORDER_STREAM)) if ld.shuffle
                 else torch.arange(n))[: ld.num_samples]
        return iter([(i, epoch) for i in order.tolist()])


class FileLoader:
    """Batches of normalized float32 inputs [B, 3, S, S] and int64 labels from a :class:`FileData`, on ``device``.

    Same contract as :class:`~prunekit.data.loader.TensorLoader`: each pass is one epoch, order and augmentation
    of epoch ``e`` depend only on ``(seed, e)``, :meth:`set_epoch` moves to an epoch, and the epoch advances after
    a complete pass (unless ``advance=False``, which replays the same epoch on every pass, e.g. a scoring set).
    """

    def __init__(self, data: FileData, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 augment: bool = False, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 device: str | torch.device = "cpu", seed: int = 0, workers: int | None = None, advance: bool = True):
        if not isinstance(data, FileData):
            raise PrunekitError(f"FileLoader needs a FileData, got {type(data).__name__}")
        if not is_count(batch_size):
            raise PrunekitError(f"batch_size must be a positive integer, got {batch_size!r}: pass e.g. 256")
        if (mean is None) != (std is None):
            raise PrunekitError("pass both mean and std for normalization, or neither")
        _pil()
        self.data, self.batch_size, self.shuffle, self.drop_last = data, batch_size, bool(shuffle), bool(drop_last)
        self.augment, self.seed, self.advance = bool(augment), check_seed(seed), bool(advance)
        self.epoch = self._pass_epoch = 0
        self.device = torch.device(device)
        self.workers = data.workers if workers is None else int(workers)
        self._mean = self._std = None
        if mean is not None:
            self._mean = torch.tensor([float(v) for v in mean], device=self.device).view(1, -1, 1, 1)
            self._std = torch.tensor([float(v) for v in std], device=self.device).view(1, -1, 1, 1)
        self._dl = torch.utils.data.DataLoader(
            _ImageSet(data, self.augment, self.seed), batch_size=batch_size, sampler=_Keys(self),
            drop_last=self.drop_last, num_workers=self.workers, pin_memory=self.device.type == "cuda",
            persistent_workers=self.workers > 0 and self.advance and self.shuffle,
        )

    def set_epoch(self, epoch: int) -> None:
        if not is_count(epoch, 0):
            raise PrunekitError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        n = len(self.data)
        return (n // self.batch_size) * self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._pass_epoch = self.epoch
        nb = self.device.type == "cuda"
        for xb, yb in self._dl:
            x = xb.to(self.device, non_blocking=nb).float().div_(255.0)
            if self._mean is not None:
                x = x.sub_(self._mean).div_(self._std)
            yield x, yb.to(self.device, non_blocking=nb)
        if self.advance and self.epoch == epoch:
            self.epoch = epoch + 1

    def __repr__(self) -> str:
        return (f"FileLoader(n={len(self.data)}, batch_size={self.batch_size}, batches={len(self)}, "
                f"shuffle={self.shuffle}, augment={self.augment}, workers={self.workers}, epoch={self.epoch})")


def file_loaders(splits: DatasetSplits, batch_size: int, eval_batch_size: int, device, seed: int, augment: bool,
                 drop_last: bool = False) -> tuple[FileLoader, FileLoader, FileLoader]:
    """(train, val, test) :class:`FileLoader` s; what :func:`prunekit.data.loaders` returns for file datasets."""
    common = dict(mean=splits.mean, std=splits.std, device=device, seed=seed)
    return (FileLoader(splits.train, batch_size, shuffle=True, drop_last=drop_last, augment=augment, **common),
            FileLoader(splits.val, eval_batch_size, **common), FileLoader(splits.test, eval_batch_size, **common))


# ----------------------------------------------------------------------------------------------------------------
# loading


def _missing(root: Path) -> DatasetMissingError:
    base = root / "imagenet"
    return DatasetMissingError(
        f"ImageNet is not in {root}: put the ILSVRC-2012 training images into {base}/train/<wnid>/*.JPEG and the "
        f"validation images, sorted into the same class folders, into {base}/val/<wnid>/*.JPEG (add --data-dir DIR, "
        f"or set {DATA_ENV}, to use another data directory)")


def _scan(folder: Path, classes: Sequence[str] | None) -> tuple[list[str], list[str], list[int]]:
    """(class folders, file paths, labels) of an ImageFolder tree; labels follow ``classes`` (default: sorted)."""
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    classes = list(found) if classes is None else list(classes)
    index = {c: i for i, c in enumerate(classes)}
    extra = [c for c in found if c not in index]
    if extra:
        raise PrunekitError(f"{folder} has class folder {extra[0]!r} that the training folder lacks: the train and "
                            f"val folders must use the same wnids")
    paths, labels = [], []
    for c in found:
        names = sorted(e.name for e in os.scandir(folder / c) if e.is_file()
                       and e.name.lower().endswith(IMAGE_EXTENSIONS))
        paths += [str(folder / c / n) for n in names]
        labels += [index[c]] * len(names)
    if not paths:
        raise PrunekitError(f"{folder} holds no images (*.JPEG, *.jpg, *.png in class folders)")
    return classes, paths, labels


def _positive(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PrunekitError(f"imagenet option {what}={value!r} is invalid: pass a positive integer")
    return int(value)


def load_imagenet(root: Path, val_size=None, seed: int = 42, **options) -> DatasetSplits:
    """ImageNet splits of :class:`FileData` (see the module docstring). ``options``: ``image_size`` (crop side,
    224), ``resize_size`` (shorter side before the evaluation centre crop, 256), ``workers`` (decoding processes
    per loader, default min(8, CPU count))."""
    bad = sorted(set(options) - set(DEFAULTS))
    if bad:
        raise PrunekitError(f"dataset 'imagenet' takes no option {bad[0]!r}: use {', '.join(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    size, resize = _positive(o["image_size"], "image_size"), _positive(o["resize_size"], "resize_size")
    workers = min(8, os.cpu_count() or 1) if o["workers"] is None else o["workers"]
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise PrunekitError(f"imagenet option workers={workers!r} is invalid: pass an integer >= 0")
    base = Path(root) / "imagenet"
    if not (base / "train").is_dir() or not (base / "val").is_dir():
        raise _missing(Path(root))
    classes, paths, labels = _scan(base / "train", None)
    _, tpaths, tlabels = _scan(base / "val", classes)
    spec = dict(image_size=size, resize_size=resize, workers=int(workers), classes=classes)
    pool, test = FileData(paths, labels, **spec), FileData(tpaths, tlabels, **spec)
    k = val_count(IMAGENET_VAL_SIZE if val_size is None else val_size, len(pool), "imagenet")
    tr, va = stratified_split(pool.y, k, seed)
    return DatasetSplits(pool.subset(tr), pool.subset(va), test, "imagenet", (3, size, size), len(classes),
                         IMAGENET_MEAN, IMAGENET_STD, augment=True)
