"""Seed 003's magnitude codes (second_order.md §6-7): ``magni`` (|w| with an exact count per layer) and
``globalmagni`` (one global count, optionally FLOPs-weighted |w|/φ_ℓ^p). Both register their scope, so
``pk.prune`` uses it and rejects the other one."""
from __future__ import annotations


import math
from dataclasses import dataclass

import torch

from ...errors import PrunekitError
from ...flops import layer_positions
from ...modes import scoring_mode
from ...registry import ScoreContext, register


# -------------------------------------------------------------------------------------------------- magnitude


@dataclass(frozen=True)
class MagniOptions:
    """``magni`` has no options of its own. It means layer-wise selection (exact count per layer):
    :func:`check_scope` turns ``scope='global'`` into an error that points to ``globalmagni``. Until ``pk.prune``
    consults it, pass ``scope='layer'``."""


@register("magni", family="second-order baseline (magnitude)", needs_data="none", options=MagniOptions,
          sources=("003",), scope="layer", summary="|w| with an exact count per layer (every layer gets the sparsity)")
def magni(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """S = |w|, selected per layer: exactly round((1 − s)·n_ℓ) weights kept in each layer (ties by index). The
    reference scores (|w| + 1e-4)·mask; prunekit simply excludes pruned weights from the ranking (same order)."""
    return {p.name: p.tensor.detach().abs().clone() for p in ctx.params}


@dataclass(frozen=True)
class GlobalMagniOptions:
    """FLOPs reweighting (second_order.md §6): ``flops_power`` p (0 = off) divides |w| by φ_ℓ^p, where
    φ_ℓ = nnz_ℓ·P_ℓ (the layer's current MACs per example, P_ℓ its output positions) or, with
    ``flops_per_param``, P_ℓ (the MACs one weight costs); layers with larger φ lose weights first. P_ℓ needs the
    input shape of one example: ``input_shape`` or ``model.input_shape``."""

    flops_power: float = 0.0
    flops_per_param: bool = False
    input_shape: tuple[int, ...] | None = None

    def validate(self, path, error) -> None:
        if not (self.flops_power >= 0 and math.isfinite(self.flops_power)):
            raise error(f"flops_power must be a finite number >= 0, got {self.flops_power}")


@register("globalmagni", family="second-order baseline (magnitude)", needs_data="none", options=GlobalMagniOptions,
          sources=("003",), scope="global", summary="|w| with one global count; optional FLOPs reweighting |w|/φ_ℓ^p")
def globalmagni(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """S = |w| / φ_ℓ^p (p = ``flops_power``; p = 0 gives |w|), selected globally.

    φ_ℓ counts the layer's current nonzero weights (the mask in force) times its output positions. A layer with no
    weight left has φ_ℓ = 0 and no candidates; its scores are |w| = 0.
    """
    o = ctx.options
    if o.flops_power == 0:
        return {p.name: p.tensor.detach().abs().clone() for p in ctx.params}
    with scoring_mode(ctx.model, "eval"):  # layer_positions runs one forward; restore every module's mode
        layers = layer_positions(ctx.model, o.input_shape)
    out = {}
    for p in ctx.params:
        lf = layers.get(p.module_name)
        if lf is None:
            raise PrunekitError(f"globalmagni with flops_power: module {p.module_name!r} of {p.name!r} is not a "
                                "Conv/Linear layer whose FLOPs prunekit counts; exclude it or set flops_power=0")
        wname = f"{p.module_name}.weight" if p.module_name else "weight"
        wmask = ctx.masks.get(wname)
        nnz = int(wmask.sum()) if wmask is not None else lf.weights
        phi = float(lf.positions) if o.flops_per_param else float(nnz * lf.positions)
        s = p.tensor.detach().abs().double()
        out[p.name] = s / phi ** o.flops_power if phi > 0 else s
    return out
