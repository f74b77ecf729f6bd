"""Helpers shared by the curvature baselines (and seed 003's magnitude codes): the first examples of the data,
the float dtype of a model, tensors shared by several prunable entries, alive masks, positive-option checks."""
from __future__ import annotations


import warnings
from typing import Iterable, Iterator

import torch
from torch import nn

from ...batches import BatchStream
from ...errors import PrunekitError
from ...params import PrunableParam
from ...registry import ScoreContext


#: Memory budget for batched tangents / per-chunk tensors (bytes).
MAX_BYTES = 256 * 2**20

#: The selection scope each magnitude code stands for, and what to use instead for the other scope.
# ------------------------------------------------------------------------------------------------------ helpers


def first_examples(data: Iterable | None, n: int, what: str, option: str, chunk: int,
                   device: torch.device, dtype: torch.dtype | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` examples of ``data`` as consecutive (x, y) chunks of at most ``chunk`` examples, on
    ``device`` (floating inputs cast to ``dtype``). Dict batches give :class:`prunekit.batches.DictInputs` inputs
    (call the model with :func:`prunekit.batches.call`). Warns when the data holds fewer than ``n``; raises when
    none."""
    if data is None:
        raise PrunekitError(f"{what} needs data: pass data= an iterable of (inputs, targets) batches")
    try:
        iter(data)
    except TypeError:
        raise PrunekitError(f"data must be an iterable of (inputs, targets) batches, got "
                            f"{type(data).__name__}") from None
    stream = BatchStream(data, device, dtype, who=what)
    got = 0
    while got < n and (piece := stream.take(min(chunk, n - got))) is not None:
        got += piece[0].shape[0]
        yield piece
    if got == 0:
        raise PrunekitError(f"{what} got no samples: data yielded no (inputs, targets) batch with samples")
    if got < n:
        warnings.warn(f"{what}: data holds only {got} examples, fewer than {option}={n}; using all {got}",
                      UserWarning, stacklevel=3)


def float_dtype(model: nn.Module) -> torch.dtype | None:
    return next((t.dtype for t in model.parameters() if t.is_floating_point()), None)


def unique_tensors(params: list[PrunableParam]) -> list[tuple[torch.Tensor, list[PrunableParam]]]:
    """Distinct tensors (tied tensors once) with the prunable entries that name them."""
    out: dict[int, tuple[torch.Tensor, list[PrunableParam]]] = {}
    for p in params:
        out.setdefault(id(p.tensor), (p.tensor, []))[1].append(p)
    return list(out.values())


def alive_mask(ctx: ScoreContext, group: list[PrunableParam]) -> torch.Tensor:
    """Entries alive under any of the names of a (possibly tied) tensor."""
    m = ctx.masks[group[0].name].to(torch.bool)
    for p in group[1:]:
        m = m | ctx.masks[p.name].to(torch.bool)
    return m


def check_positive(error, **values) -> None:
    for k, v in values.items():
        if v < 1:
            raise error(f"{k} must be a positive integer, got {v}")
