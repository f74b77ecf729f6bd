"""Re-batching: consecutive samples of any requested count from an iterable of ``(inputs, targets)`` batches of
any size, moved to a device (and floating inputs cast to a dtype) on the way. Shared by every criterion that
regroups its data into its own mini-batches."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .errors import PrunekitError


def labelled_pair(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of a batch, checked: a pair of tensors with the same number of samples along
    dimension 0; a :class:`PrunekitError` naming what was given otherwise."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise PrunekitError(f"each data batch must be a pair (inputs, targets); got {what}")
    x, y = batch
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise PrunekitError("data batches must hold tensors (inputs, targets), got "
                            f"({type(x).__name__}, {type(y).__name__})")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise PrunekitError(f"inputs of shape {tuple(x.shape)} and targets of shape {tuple(y.shape)} do not hold "
                            "the same number of samples along dimension 0")
    return x, y


class BatchStream:
    """``take(k)`` returns the next k samples (fewer only at the end of the data), ``peek()`` the next input."""

    def __init__(self, data: Iterable, device: torch.device | str = "cpu", fdtype: torch.dtype | None = None,
                 who: str = "this method"):
        if data is None:
            raise PrunekitError(f"{who} needs data: pass an iterable of (inputs, targets) batches")
        try:
            self._it = iter(data)
        except TypeError:
            raise PrunekitError(f"data must be an iterable of (inputs, targets) batches, got {type(data).__name__}")
        self._xs: list[torch.Tensor] = []
        self._ys: list[torch.Tensor] = []
        self._n = 0
        self._done = False
        self.device, self.fdtype = torch.device(device), fdtype

    def _pull(self) -> None:
        try:
            batch = next(self._it)
        except StopIteration:
            self._done = True
            return
        x, y = labelled_pair(batch)
        if x.shape[0] == 0:
            return
        x = x.to(self.device)
        if self.fdtype is not None and x.is_floating_point() and x.dtype != self.fdtype:
            x = x.to(self.fdtype)
        self._xs.append(x)
        self._ys.append(y.to(self.device))
        self._n += x.shape[0]

    def peek(self) -> torch.Tensor | None:
        """The input of the next sample, with its batch dimension (not consumed), or None at the end."""
        while self._n == 0 and not self._done:
            self._pull()
        return self._xs[0][:1] if self._n else None

    def take(self, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The next ``k`` samples (fewer only at the end of the data), or None when the data is exhausted."""
        while self._n < k and not self._done:
            self._pull()
        if self._n == 0:
            return None
        x = self._xs[0] if len(self._xs) == 1 else torch.cat(self._xs)
        y = self._ys[0] if len(self._ys) == 1 else torch.cat(self._ys)
        if x.shape[0] > k:
            self._xs, self._ys = [x[k:]], [y[k:]]
            self._n = x.shape[0] - k
            return x[:k], y[:k]
        self._xs, self._ys, self._n = [], [], 0
        return x, y


def rebatch(data: Iterable, size: int, device: torch.device | str = "cpu", who: str = "this method"
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches of ``size`` samples (the last may be smaller) on ``device``."""
    stream = BatchStream(data, device, who=who)
    while (piece := stream.take(size)) is not None:
        yield piece
