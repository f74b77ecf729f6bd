"""Inputs and scores of channel selection: an example input for tracing a model (from the scoring data or its
``input_shape``), the channel groups cached per model object, and the channel scores of the filter baselines (the
l_p norm of each channel's producer rows, the |gamma| of its BatchNorm)."""
from __future__ import annotations

import math
import weakref
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import PrunekitError
from .channel_group import ChannelGroup, row_channels, transposed
from .group_cache import groups_by_structure
from .groups import channel_groups
from .transformer_groups import is_transformer


# ------------------------------------------------------------------------------------------------- inputs
def _first_param(model: nn.Module) -> torch.Tensor | None:
    return next((p for p in model.parameters() if p.is_floating_point()), None)


def example_input_for(model: nn.Module, ctx_or_data: Any = None, batch: int = 2):
    """An example input batch of ``batch`` (>= 2) samples for tracing ``model``'s channel groups.

    From ``model.input_shape`` (a fixed random batch, seed 0, on the model's device and dtype) when the model has
    one; else from the first batch of the data (``ctx_or_data``: a :class:`prunekit.ScoreContext`, whose
    ``data`` is used, or an iterable of ``(inputs, targets)`` batches or of input tensors), cut to ``batch``
    samples or repeated up to it. Raises :class:`PrunekitError` when neither is available.
    """
    batch = max(2, int(batch))
    p = _first_param(model)
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        x = torch.randn(batch, *tuple(shape), generator=torch.Generator().manual_seed(0))
        return x.to(device=p.device, dtype=p.dtype) if p is not None else x
    data = ctx_or_data.data if hasattr(ctx_or_data, "data") and hasattr(ctx_or_data, "model") else ctx_or_data
    if data is not None:
        first = next(iter(data), None)
        x = first[0] if isinstance(first, (tuple, list)) and first else first
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] >= 1:
            if x.shape[0] < batch:
                x = x.repeat(math.ceil(batch / x.shape[0]), *([1] * (x.dim() - 1)))
            x = x[:batch]
            return x.to(device=p.device) if p is not None else x
    raise PrunekitError(f"structured pruning needs an example input to trace {type(model).__name__}'s channel "
                        "groups: set model.input_shape = (C, H, W) or pass data= an iterable of (inputs, targets)")


_GROUP_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list[ChannelGroup]]]" = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    return tuple((n, type(m).__name__) for n, m in model.named_modules()) + tuple(
        (n, tuple(p.shape)) for n, p in model.named_parameters())


def cached_channel_groups(model: nn.Module, ctx_or_data: Any = None) -> list[ChannelGroup]:
    """:func:`prunekit.structured.channel_groups` of ``model`` on :func:`example_input_for`, cached per model
    object (recomputed when its modules or parameter shapes change); pruning rounds reuse one trace. A new object
    of an architecture traced before gets that trace's groups (:mod:`prunekit.structured.group_cache`)."""
    sig = _signature(model)
    hit = _GROUP_CACHE.get(model)
    if hit is not None and hit[0] == sig:
        return hit[1]
    # a transformers model's groups come from its module structure: no example input needed
    example = None if is_transformer(model) else example_input_for(model, ctx_or_data)
    groups = groups_by_structure(model, example, channel_groups)
    _GROUP_CACHE[model] = (sig, groups)
    return groups


# ------------------------------------------------------------------------------------------------- scores
def _producer_rows(mod: nn.Module) -> torch.Tensor:
    """The producer's weight as (output units, rest)."""
    w = mod.weight.detach()
    if transposed(mod):
        w = w.transpose(0, 1)
    return w.reshape(w.shape[0], -1)


@torch.no_grad()
def filter_norm_scores(model: nn.Module, groups: Sequence[ChannelGroup], p: float = 1) -> dict[str, torch.Tensor]:
    """Per channel, the lp norm of the filters that write it (float64, CPU), for every group.

    A filter is the producer's weight row of the channel (a transposed conv's or GPT-2 Conv1D's ``weight[:, c]``);
    the current (masked) weights are used. For a group with several producers (residual-tied) the norm is that of
    all its filters together: ``p=1`` sums the l1 norms (Li et al.), ``p=2`` is the l2 norm of the concatenated
    filters (sqrt of the summed squares; SoftNet, He et al.). A channel that owns several rows (an attention head:
    its ``head_dim`` rows of each of query, key and value) is aggregated the same way: the l1 norms of all its rows
    summed, the l2 norm of all its rows together. Each row is summed in float64 (converted a few rows at a time).
    """
    mods = dict(model.named_modules())
    out = {}
    for g in groups:
        acc = torch.zeros(g.size, dtype=torch.float64)
        for name in g.producers:
            per_row = _row_norms(_producer_rows(mods[name]), p).cpu()
            if per_row.numel() != g.size:  # several units per channel (heads)
                per_row = torch.zeros(g.size, dtype=torch.float64).index_add_(0, row_channels(g), per_row)
            acc += per_row
        out[g.name] = acc if p == 1 else acc.pow(1.0 / p)
    return out


def _row_norms(rows: torch.Tensor, p: float) -> torch.Tensor:
    """Σ_k |rows[r, k]|^p per row, in float64: the rows converted in slices of about 64k entries (the same
    per-row reductions as converting the whole tensor, without its float64 copy); rows longer than that at once."""
    n, k = rows.shape
    step = (1 << 16) // k if 0 < k <= (1 << 15) else max(n, 1)
    out = []
    for r0 in range(0, rows.shape[0], step):
        x = rows[r0:r0 + step].to(torch.float64).abs()
        out.append((x.pow(p) if p != 1 else x).sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=rows.device)


@torch.no_grad()
def bn_scale_scores(model: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Per channel, |gamma| of the group's BatchNorm (the largest over the tied norms of a residual group); float64,
    CPU. Groups without a norm that has an affine ``weight`` are absent."""
    mods = dict(model.named_modules())
    out = {}
    for g in groups:
        gammas = [mods[n].weight.detach().abs().to(torch.float64).cpu() for n in g.norms
                  if isinstance(getattr(mods[n], "weight", None), torch.Tensor)]
        if gammas:
            out[g.name] = torch.stack(gammas).amax(0)
    return out
