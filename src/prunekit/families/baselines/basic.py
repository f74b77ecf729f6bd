"""Data-free baselines: ``none``, ``random``, ``magnitude`` (seeds 000 and 004)."""
from __future__ import annotations

import torch

from ...registry import ScoreContext, register


@register("none", family="baseline (dense)", needs_data="none", sources=("000",), kind="dense",
          summary="no mask: the dense model trained in the same pipeline")
def none(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Every entry scores 1 (all kept): ``pk.score(model, 'none')`` is well defined, ``pk.prune`` adds no mask."""
    return {p.name: torch.ones_like(p.tensor, dtype=torch.float32) for p in ctx.params}


@register("random", family="baseline", needs_data="none", sources=("000", "004"),
          summary="a uniformly random subset of exactly the requested size")
def random(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """i.i.d. uniform scores from the mask generator (not the training RNG); ranking them keeps a uniform subset."""
    return {
        p.name: torch.rand(p.tensor.shape, generator=ctx.generator, dtype=torch.float64).to(p.tensor.device)
        for p in ctx.params
    }


@register("magnitude", family="pruning at init / anytime", needs_data="none", sources=("000", "004"),
          summary="keep the largest |weight| of the current (possibly trained) weights")
def magnitude(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    return {p.name: p.tensor.detach().abs().clone() for p in ctx.params}
