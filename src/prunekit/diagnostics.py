"""Layer-collapse diagnostics (pai.md §3.3).

After pruning: which prunable tensors kept nothing (collapsed) or almost nothing, and whether any input-output path
survives. Connectivity is checked on a float64 copy of the network in which every prunable weight is replaced by its
0/1 mask, every other weight by its absolute value, every Conv/Linear bias by 0 and every normalization layer by a
positive rescaling (running mean 0, variance 1, γ = 1, β = 0), in eval mode, fed an all-ones input. Every factor is
then non-negative and ReLU passes positive values, so the output of the last prunable layer (in forward order) is
nonzero exactly when at least one path of kept weights connects it to the input. Identity shortcuts count as paths,
as they do in the real network.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .masks import Masks
from .modes import NORM_TYPES


@dataclass
class CollapseReport:
    collapsed: list[str] = field(default_factory=list)       # tensors with no kept entry
    near_collapsed: list[str] = field(default_factory=list)  # density below the threshold (collapsed excluded)
    connected: bool | None = None                             # None: not checked (no input shape)
    min_density: float = 1.0

    def to_dict(self) -> dict:
        return {"collapsed": self.collapsed, "near_collapsed": self.near_collapsed, "connected": self.connected,
                "min_density": self.min_density}


@torch.no_grad()
def connected(model: nn.Module, masks: Masks, input_shape) -> bool:
    """True when some input-output path of kept weights exists (see the module docstring)."""
    net = copy.deepcopy(model).double().eval()
    for p in net.parameters():
        p.abs_()
    for mod in net.modules():
        if isinstance(mod, NORM_TYPES):
            for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                t = getattr(mod, name, None)
                if torch.is_tensor(t):
                    t.fill_(value)
        elif isinstance(getattr(mod, "bias", None), nn.Parameter):
            mod.bias.zero_()  # a bias starts paths that do not come from the input
    named = dict(net.named_parameters())
    for name, m in masks.items():
        named[name].copy_(m.to(named[name].dtype))
    owners = {name.rpartition(".")[0] for name in masks.names()}
    modules = dict(net.named_modules())
    last: list[torch.Tensor] = []
    hooks = [modules[o].register_forward_hook(lambda _m, _i, out: last.append(out)) for o in owners]
    try:
        net(torch.ones(1, *input_shape, dtype=torch.float64, device=next(net.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return bool(last) and bool(last[-1].abs().sum() > 0)


def collapse_report(model: nn.Module, masks: Masks, input_shape=None, near: float = 1e-3) -> CollapseReport:
    """Collapsed and near-collapsed tensors (density < ``near``) and, given ``input_shape`` (or
    ``model.input_shape``), whether the network still connects input to output."""
    stats = masks.layer_stats()
    rep = CollapseReport(
        collapsed=[s.name for s in stats if s.kept == 0],
        near_collapsed=[s.name for s in stats if 0 < s.kept and s.density < near],
        min_density=min((s.density for s in stats), default=1.0),
    )
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is not None:
        rep.connected = connected(model, masks, tuple(shape))
    return rep
