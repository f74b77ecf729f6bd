"""Re-batching: consecutive samples of any requested count from an iterable of ``(inputs, targets)`` batches of
any size, moved to a device (and floating inputs cast to a dtype) on the way. Shared by every criterion that
regroups its data into its own mini-batches.

Dict batches (Hugging Face style: ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``) are read here too:
:func:`labelled_pair` turns one into ``(DictInputs, labels)``, where :class:`DictInputs` holds every tensor of the
batch (``labels`` included, so that a transformers model computes its own ``.loss``) and slices, concatenates and
moves like a tensor of samples; :func:`call` runs a model on either form (``model(**batch)`` for a dict)."""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import torch

from .errors import PrunekitError

#: The key of the targets in a dict batch.
LABELS = "labels"


class DictInputs:
    """The tensors of a dict batch, all with the samples along dimension 0; the model is called as
    ``model(**tensors)``. Supports what re-batching needs: ``shape[0]``, slicing, ``to``, :meth:`cat`."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = dict(tensors)

    @property
    def shape(self) -> torch.Size:
        return torch.Size([next(iter(self.tensors.values())).shape[0]])

    def dim(self) -> int:
        return 1

    def is_floating_point(self) -> bool:
        return False  # floating tensors are cast one by one in to()

    def is_complex(self) -> bool:
        return False

    def __getitem__(self, index: slice) -> "DictInputs":
        return DictInputs({k: v[index] for k, v in self.tensors.items()})

    def to(self, device, fdtype: torch.dtype | None = None) -> "DictInputs":
        out = {}
        for k, v in self.tensors.items():
            v = v.to(device)
            if fdtype is not None and v.is_floating_point() and v.dtype != fdtype:
                v = v.to(fdtype)
            out[k] = v
        return DictInputs(out)

    @staticmethod
    def cat(parts: list["DictInputs"]) -> "DictInputs":
        """The parts' examples in one DictInputs; a PrunekitError when their keys or per-example shapes differ
        (dict batches padded to different sequence lengths cannot be regrouped)."""
        keys = list(parts[0].tensors)
        for p in parts[1:]:
            if list(p.tensors) != keys:
                raise PrunekitError(f"dict batches with different keys cannot be regrouped: {keys} and "
                                    f"{list(p.tensors)}")
            for k in keys:
                a, b = parts[0].tensors[k], p.tensors[k]
                if a.shape[1:] != b.shape[1:]:
                    raise PrunekitError(
                        f"dict batches of different shapes cannot be regrouped into one batch: {k!r} is "
                        f"{tuple(a.shape)} in one batch and {tuple(b.shape)} in another; pad every batch to one "
                        "sequence length (e.g. the tokenizer's padding='max_length'), or set the method's batch size "
                        "to the size of your batches")
        return DictInputs({k: torch.cat([p.tensors[k] for p in parts]) for k in keys})


def call(model, x):
    """``model(x)`` for a tensor, ``model(**x.tensors)`` for the inputs of a dict batch."""
    return model(**x.tensors) if isinstance(x, DictInputs) else model(x)


def _dict_pair(batch: Mapping) -> tuple[DictInputs, torch.Tensor]:
    bad = [k for k, v in batch.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PrunekitError(f"a dict data batch must hold tensors only; {bad[0]!r} is a {type(batch[bad[0]]).__name__}")
    if LABELS not in batch:
        raise PrunekitError(f"a dict data batch needs its targets under 'labels' (keys given: {', '.join(batch)})")
    sizes = {k: (v.shape[0] if v.dim() else None) for k, v in batch.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise PrunekitError(f"the tensors of a dict data batch must hold the same number of samples along "
                            f"dimension 0; got {sizes}")
    return DictInputs(batch), batch[LABELS]


def labelled_pair(batch) -> tuple[torch.Tensor | DictInputs, torch.Tensor]:
    """``(inputs, targets)`` of a batch, checked: a pair of tensors with the same number of samples along
    dimension 0, or a dict of such tensors with ``labels`` (inputs then a :class:`DictInputs`); a
    :class:`PrunekitError` naming what was given otherwise."""
    if isinstance(batch, Mapping):
        return _dict_pair(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], DictInputs):
        return batch[0], batch[1]  # re-batched pieces of dict batches
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
        if isinstance(x, DictInputs):
            x = x.to(self.device, self.fdtype)
        else:
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
        x = self._xs[0] if len(self._xs) == 1 else (
            DictInputs.cat(self._xs) if isinstance(self._xs[0], DictInputs) else torch.cat(self._xs))
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
