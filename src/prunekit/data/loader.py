"""A minimal, fast loader over in-memory tensors, with batched augmentation on the target device."""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from ..errors import PrunekitError, is_count
from ._util import check_seed, generator
from .datasets import DatasetSplits, TensorData

_ORDER_STREAM, _AUG_STREAM = 0x0DE5, 0xA06E


def _augment_params(n: int, pad: int, flip: bool, g: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets ``dy``, ``dx`` in [0, 2*pad] (into the zero-padded image) and a horizontal-flip flag,
    drawn from ``g`` in that order. The loader draws these once per epoch, for all samples, in batch order."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    fl = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return dy, dx, fl


def _crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, fl: torch.Tensor, pad: int) -> torch.Tensor:
    """Batched random crop + horizontal flip of ``x`` [B, C, H, W] (any dtype).

    Sample ``i`` becomes the H x W window at rows ``dy[i]..``, columns ``dx[i]..`` of the image zero-padded by
    ``pad`` on every side, mirrored left-right where ``fl[i]``. One padded copy and one gather, no Python loop.
    """
    b, c, h, w = x.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    if pad:
        padded = x.new_zeros((b, c, hp, wp))
        padded[:, :, pad:pad + h, pad:pad + w] = x
    else:
        padded = x.contiguous()
    dev = x.device
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy.to(dev)[:, None] + ar_h  # [B, H] source rows in the padded image
    cols = dx.to(dev)[:, None] + torch.where(fl.to(dev)[:, None], (w - 1) - ar_w, ar_w)  # [B, W] source columns
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, hp * wp).gather(2, flat).view(b, c, h, w)


def _stats(values, what: str, channels: int | None) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise PrunekitError(f"{what} must be a sequence of numbers, one per channel, got {values!r}") from None
    if channels is not None and len(vals) not in (1, channels):
        raise PrunekitError(f"{what} has {len(vals)} values but the data has {channels} channels: pass one value "
                            f"per channel")
    return vals


class TensorLoader:
    """Iterate over ``data`` in batches of float32 inputs and int64 labels, all kept on ``device``.

    The dataset is moved to ``device`` once. Each pass over the loader is one epoch; the shuffle order and the
    augmentation draws of epoch ``e`` depend only on ``(seed, e)``, so a run resumed at epoch ``e`` (via
    :meth:`set_epoch`) sees the same batches. The epoch advances by one after every complete pass.

    Per batch: optional augmentation on the raw pixels (random crop from the image zero-padded by ``pad``, random
    horizontal flip if ``flip``), conversion to float in [0, 1] (``data.scale``), then ``(x - mean) / std`` if
    ``mean``/``std`` are given.
    """

    def __init__(self, data: TensorData, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 augment: bool = False, pad: int = 4, flip: bool = True, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, device: str | torch.device = "cpu", seed: int = 0):
        if not isinstance(data, TensorData):
            raise PrunekitError(f"TensorLoader needs a TensorData, got {type(data).__name__}: wrap tensors as "
                                f"TensorData(x, y)")
        if not is_count(batch_size):
            raise PrunekitError(f"batch_size must be a positive integer, got {batch_size!r}: pass e.g. 128")
        if not is_count(pad, 0):
            raise PrunekitError(f"pad must be an integer >= 0, got {pad!r}: pass e.g. 4")
        if augment and data.x.dim() != 4:
            raise PrunekitError(f"augmentation needs images [n, C, H, W], got x of shape {tuple(data.x.shape)}: "
                                f"pass augment=False")
        if (mean is None) != (std is None):
            raise PrunekitError("pass both mean and std for normalization, or neither")
        self.batch_size, self.shuffle, self.drop_last = batch_size, bool(shuffle), bool(drop_last)
        self.augment, self.pad, self.flip = bool(augment), pad, bool(flip)
        self.seed = check_seed(seed)
        self.epoch = 0
        try:
            self.device = torch.device(device)
            self.x = data.x.to(self.device)
            self.y = data.y.to(self.device)
        except (RuntimeError, AssertionError, TypeError) as exc:
            raise PrunekitError(f"device {str(device)!r} is not usable ({str(exc).splitlines()[0]}): pass "
                                f"device='cpu' or an available accelerator") from exc
        self.scale = data.input_scale
        self.mean = self.std = None
        self._mean = self._std = None
        if mean is not None:
            channels = self.x.shape[1] if self.x.dim() >= 2 else None
            self.mean, self.std = _stats(mean, "mean", channels), _stats(std, "std", channels)
            if any(s <= 0 or not math.isfinite(s) for s in self.std):
                raise PrunekitError(f"std must be positive, got {self.std}: pass per-channel standard deviations")
            view = (1, -1) + (1,) * max(self.x.dim() - 2, 0)
            self._mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(view)
            self._std = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(view)

    # -- epochs ---------------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` (e.g. when resuming a run)."""
        if not is_count(epoch, 0):
            raise PrunekitError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = epoch

    def _generators(self, epoch: int) -> tuple[torch.Generator, torch.Generator]:
        """(shuffle-order generator, augmentation generator) of ``epoch``; both depend only on (seed, epoch)."""
        return generator(self.seed, epoch, _ORDER_STREAM), generator(self.seed, epoch, _AUG_STREAM)

    # -- iteration ------------------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples per epoch (fewer than the dataset with ``drop_last``)."""
        n = int(self.y.shape[0])
        return (n // self.batch_size) * self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        n = int(self.y.shape[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _prepare(self, xb: torch.Tensor, fresh: bool) -> torch.Tensor:
        x = xb.to(torch.float32)
        fresh = fresh or xb.dtype != torch.float32
        if self.scale != 1.0:
            x = x.div_(self.scale) if fresh else x / self.scale
            fresh = True
        if self._mean is not None:
            x = x.sub_(self._mean) if fresh else x - self._mean
            x = x.div_(self._std)
            fresh = True
        return x if fresh else x.clone()  # never hand out a view of the stored data

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        order_g, aug_g = self._generators(epoch)
        n = int(self.y.shape[0])
        perm = torch.randperm(n, generator=order_g).to(self.device) if self.shuffle else None
        if self.augment:
            params = [p.to(self.device) for p in _augment_params(n, self.pad, self.flip, aug_g)]
        bs = self.batch_size
        for i in range(len(self)):
            s, e = i * bs, min((i + 1) * bs, n)
            if perm is None:
                xb, yb = self.x[s:e], self.y[s:e].clone()
            else:
                idx = perm[s:e]
                xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            fresh = perm is not None
            if self.augment:
                dy, dx, fl = (p[s:e] for p in params)
                xb, fresh = _crop_flip(xb, dy, dx, fl, self.pad), True
            yield self._prepare(xb, fresh), yb
        if self.epoch == epoch:  # not moved by set_epoch() meanwhile
            self.epoch = epoch + 1

    def __repr__(self) -> str:
        return (f"TensorLoader(n={int(self.y.shape[0])}, batch_size={self.batch_size}, batches={len(self)}, "
                f"shuffle={self.shuffle}, augment={self.augment}, device={self.device}, epoch={self.epoch})")


def loaders(splits: DatasetSplits, batch_size: int, eval_batch_size: int = 1000, device: str | torch.device = "cpu",
            seed: int = 0, augment: bool | None = None, drop_last: bool = False
            ) -> tuple[TensorLoader, TensorLoader, TensorLoader]:
    """(train, val, test) loaders, normalized with the dataset's mean/std. Only the training loader shuffles and
    augments (``augment=None``: the dataset default, i.e. crop + flip for CIFAR, nothing for MNIST/synthetic)."""
    if not isinstance(splits, DatasetSplits):
        raise PrunekitError(f"loaders needs DatasetSplits from load_dataset, got {type(splits).__name__}")
    aug = splits.augment if augment is None else bool(augment)
    if not isinstance(splits.train, TensorData):  # files decoded per batch (ImageNet)
        from .imagenet import file_loaders

        return file_loaders(splits, batch_size, eval_batch_size, device, seed, aug, drop_last)
    common = dict(mean=splits.mean, std=splits.std, device=device, seed=seed)
    train = TensorLoader(splits.train, batch_size, shuffle=True, drop_last=drop_last, augment=aug, **common)
    val = TensorLoader(splits.val, eval_batch_size, **common)
    test = TensorLoader(splits.test, eval_batch_size, **common)
    return train, val, test
