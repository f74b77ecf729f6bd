"""Channel masks (``{group name: bool keep-mask}``) and per-weight masks.

:func:`check_channel_masks` validates channel masks against the groups, :func:`channel_masks_to_masks` turns them
into per-weight masks, :func:`make_exact` zeroes what keeps a removed channel's output from being exactly 0, and
:func:`channel_masks_from_masks` reads channel masks back off per-weight masks. Every function handles channels
that own several output units (``ChannelGroup.rows`` / ``splits``) and weights stored (in, out) (:func:`transposed`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..errors import PrunekitError, closest
from .channel_group import ChannelGroup, expand_rows, row_channels, transposed


def _by_name(groups: Sequence[ChannelGroup]) -> dict[str, ChannelGroup]:
    return {g.name: g for g in groups}


def check_channel_masks(groups: Sequence[ChannelGroup], channel_masks: Mapping[str, torch.Tensor]
                        ) -> dict[str, torch.Tensor]:
    """Validate ``{group name: bool keep-mask of length size}`` against ``groups``; returns CPU bool masks.

    Raises :class:`PrunekitError` for an unknown group name, a wrong length, a group left with no channel, or a
    removed channel in a group that is not prunable (the message gives the reason).
    """
    by = _by_name(groups)
    out = {}
    for name, m in channel_masks.items():
        if name not in by:
            near = closest(name, list(by))
            hint = f"did you mean {', '.join(map(repr, near))}?" if near else f"known groups: {', '.join(by)}"
            raise PrunekitError(f"channel mask for unknown group {name!r}: {hint}")
        g = by[name]
        m = torch.as_tensor(m).detach().to("cpu", torch.bool).reshape(-1)
        if m.numel() != g.size:
            raise PrunekitError(f"channel mask for group {name!r} has {m.numel()} entries, the group has {g.size}")
        if not bool(m.all()) and not g.prunable:
            raise PrunekitError(f"group {name!r} is not prunable ({g.reason}); keep all of its channels")
        if not bool(m.any()):
            raise PrunekitError(f"channel mask for group {name!r} removes every channel; keep at least one")
        out[name] = m
    return out


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _param_name(mname: str, attr: str) -> str:
    return f"{mname}.{attr}" if mname else attr


def _expand(keep: torch.Tensor, block: int) -> torch.Tensor:
    return keep.repeat_interleave(block) if block != 1 else keep


def channel_masks_to_masks(model: nn.Module, groups: Sequence[ChannelGroup],
                           channel_masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-weight boolean masks (``True`` = kept) that remove the masked channels from ``model``.

    For every group named in ``channel_masks`` the result has the ``weight`` of each producer (output rows; a
    transposed conv's ``weight[:, c]``) and of each consumer (input slices: ``weight[:, c]`` of a conv, the
    ``block`` columns of a linear layer after a flatten), named as in ``model.named_parameters()``, on the device
    of the weight. Weights of several groups combine with AND. Weights of groups not named are absent (a subset
    suitable for ``Masks.set``). Applying these masks and :func:`make_exact` gives a model whose outputs equal
    those of ``shrink(model, channel_masks)``.
    """
    cm = check_channel_masks(groups, channel_masks)
    mods = _modules(model)
    out: dict[str, torch.Tensor] = {}

    def get(mname: str) -> torch.Tensor:
        key = _param_name(mname, "weight")
        if key not in out:
            w = mods[mname].weight
            out[key] = torch.ones(w.shape, dtype=torch.bool, device=w.device)
        return out[key]

    for g in groups:
        if g.name not in cm:
            continue
        keep = cm[g.name]
        for p in g.producers:
            mask = get(p)
            k = expand_rows(keep, g).to(mask.device)
            if transposed(mods[p]):
                mask[:, ~k] = False
            else:
                mask[~k] = False
        for cname, block in g.consumers:
            mask = get(cname)
            k = _expand(keep, block).to(mask.device)
            if transposed(mods[cname]):
                mask[~k] = False
            else:
                mask[:, ~k] = False
    return out


@torch.no_grad()
def make_exact(model: nn.Module, groups: Sequence[ChannelGroup], channel_masks: Mapping[str, torch.Tensor]) -> None:
    """Zero, in place, what keeps a removed channel's output from being exactly 0 once its weight rows are 0.

    For every removed channel: its entries in each producer's ``bias``, each norm's ``weight`` (gamma) and
    ``bias`` (beta), and each norm's ``running_mean`` (so a norm without affine parameters also outputs 0 in eval
    mode). Then a removed channel leaving its BN is exactly 0 (for any input, train or eval mode).

    Why: zeroing only a conv's rows leaves the BN output ``beta - gamma * mean / sqrt(var + eps)``, a constant per
    channel that still reaches the consumers. Zeroing the consumers' input slices too drops that constant silently,
    so the masked model then differs from the model before masking by a hidden bias shift, and a producer-only
    masked model differs from the physically shrunk one. After ``make_exact`` (and the weight masks of
    :func:`channel_masks_to_masks`), masked and shrunk models compute the same function.
    """
    cm = check_channel_masks(groups, channel_masks)
    mods = _modules(model)
    for g in groups:
        if g.name not in cm or bool(cm[g.name].all()):
            continue
        for p in g.producers:
            b = getattr(mods[p], "bias", None)
            if b is not None:
                b[~expand_rows(cm[g.name], g).to(b.device)] = 0
        for n in g.norms:
            m = mods[n]
            for attr in ("weight", "bias", "running_mean"):
                t = getattr(m, attr, None)
                if isinstance(t, torch.Tensor):
                    t[~cm[g.name].to(t.device)] = 0


def _lookup(masks, name: str):
    return masks[name] if name in masks else None


def channel_masks_from_masks(model: nn.Module, groups: Sequence[ChannelGroup],
                             masks: Mapping[str, torch.Tensor], side: str = "either") -> dict[str, torch.Tensor]:
    """Channel keep-masks (``{group name: bool}``, prunable groups only) read off per-weight masks.

    ``masks`` maps weight names to bool masks (a :class:`prunekit.Masks` or a plain dict). A channel is removed
    when every producer's row of it is fully masked (``side="producers"``: filter pruning), when every consumer's
    slice of it is fully masked (``side="consumers"``: input-channel pruning such as PFP), or either
    (``"either"``, default).
    Weights absent from ``masks`` count as unmasked; in a residual-tied group all members must agree. At least one
    channel per group is kept (the one the masks remove last is not defined: the lowest index is kept).
    """
    if side not in ("either", "producers", "consumers"):
        raise PrunekitError(f"side must be 'either', 'producers' or 'consumers', got {side!r}")
    mods = _modules(model)
    out = {}
    for g in groups:
        if not g.prunable:
            continue
        dead_p = torch.ones(g.size, dtype=torch.bool)
        dead_c = torch.ones(g.size, dtype=torch.bool)
        for p in g.producers:
            m = _lookup(masks, _param_name(p, "weight"))
            if m is None:
                dead_p[:] = False
                continue
            m = m.detach().to("cpu", torch.bool)
            m = m.transpose(0, 1) if transposed(mods[p]) else m
            alive_rows = m.reshape(m.shape[0], -1).any(1)
            if g.rows != 1 or g.splits != 1:  # a channel is alive while any of its units is
                alive_rows = torch.zeros(g.size, dtype=torch.long).index_add_(
                    0, row_channels(g), alive_rows.long()) > 0
            dead_p &= ~alive_rows
        if not g.consumers:
            dead_c[:] = False
        for cname, block in g.consumers:
            m = _lookup(masks, _param_name(cname, "weight"))
            if m is None:
                dead_c[:] = False
                continue
            m = m.detach().to("cpu", torch.bool)
            m = m if transposed(mods[cname]) else m.transpose(0, 1)
            alive = m.reshape(m.shape[0], -1).any(1).reshape(g.size, block).any(1)
            dead_c &= ~alive
        dead = {"producers": dead_p, "consumers": dead_c, "either": dead_p | dead_c}[side]
        keep = ~dead
        if not bool(keep.any()):
            keep[0] = True
        out[g.name] = keep
    return out

