"""Fisher-based criteria for pruning at initialization (seed 000): ``fisher_diag``, ``fisher_pruner``, ``fts``,
``fbss``.

ḡ and F̂ (the mean over scoring mini-batches of g_b and of g_b ⊙ g_b) come from one pass of
:func:`prunekit.gradstats.grad_stats`. With B = 1, F̂ is the exact empirical Fisher diagonal. One formula holds for
every B. Reference defect fixed: seed 000 caps its loader at 4096 and then switches formulas (fisher_diag becomes ḡ²,
fts and fbss use an unsquared term).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ...registry import ScoreContext, register
from .gradient import GradOptions, mean_gradient


@register("fisher_diag", family="pruning at init (Fisher)", needs_data="labels", options=GradOptions,
          sources=("000",), dict_batches=True,
          summary="FD: the empirical Fisher diagonal F̂")
def fisher_diag(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """S = F̂. Entries whose gradient is 0 on every mini-batch (dead units) score exactly 0."""
    st = mean_gradient(ctx, need_sq=True)
    return {p.name: st.sq[p.name] for p in ctx.params}


@register("fisher_pruner", family="pruning at init (Fisher, OBD-style)", needs_data="labels", options=GradOptions,
          sources=("000",), dict_batches=True,
          summary="FP: OBD saliency ½·θ²·F̂ with the Fisher diagonal for the Hessian")
def fisher_pruner(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    st = mean_gradient(ctx, need_sq=True)
    return {p.name: 0.5 * p.tensor.detach() ** 2 * st.sq[p.name] for p in ctx.params}


@dataclass(frozen=True)
class FTSOptions(GradOptions):
    """``fts_batch_factor``: multiply F̂ by B (c_B = B, the seed 000 code; false: c_B = 1, the follow-up code);
    ``fts_signed``: the follow-up's signed variant S = −(θ·ḡ + ½·θ²·c_B·F̂)."""

    fts_batch_factor: bool = True
    fts_signed: bool = False


def _c_b(o) -> float:
    return float(o.batch_size) if o.fts_batch_factor else 1.0


@register("fts", family="pruning at init (Fisher–Taylor)", needs_data="labels", options=FTSOptions, sources=("000",),
          dict_batches=True,
          summary="Fisher–Taylor sensitivity |θ·ḡ + ½·θ²·c_B·F̂| (seed 000)")
def fts(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """S = |θ⊙ḡ + ½·θ²⊙(c_B·F̂)|, the abs taken after adding both terms (first-order term with a plus sign, as in
    both FTS codes). ``fts_signed``: S = −(θ⊙ḡ + ½·θ²⊙(c_B·F̂))."""
    o = ctx.options
    st = mean_gradient(ctx, need_sq=True)
    c = _c_b(o)
    out = {}
    for p in ctx.params:
        th = p.tensor.detach()
        taylor = th * st.mean[p.name] + 0.5 * th**2 * (c * st.sq[p.name])
        out[p.name] = -taylor if o.fts_signed else taylor.abs()
    return out


@dataclass(frozen=True)
class FBSSOptions(GradOptions):
    """``damp`` λ and ``damp_mode``: ``relative`` (λ = damp · mean of c_B·F̂ over alive prunable entries; damp
    itself when that mean is 0) or ``absolute`` (λ = damp); ``fts_batch_factor`` as for ``fts``."""

    fts_batch_factor: bool = True
    damp: float = 1e-5
    damp_mode: Literal["relative", "absolute"] = "relative"

    def validate(self, path, error) -> None:
        super().validate(path, error)
        if self.damp <= 0:
            raise error(f"damp must be > 0 (it keeps 1/H finite where F̂ = 0), got {self.damp}")


@register("fbss", family="pruning at init (Fisher brain surgeon)", needs_data="labels", options=FBSSOptions,
          sources=("000",), dict_batches=True,
          summary="Fisher brain-surgeon sensitivity ½·H·(θ − ḡ/H)², H = c_B·F̂ + λ (seed 000)")
def fbss(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """S = ½·H⊙(θ − ḡ/H)² with H = c_B·F̂ + λ: under the diagonal quadratic model, the loss change of setting θ_j to
    0 minus the best change reachable on that coordinate. Non-negative, computed in the factored form.

    Reference defect fixed: seed 000 defines DAMP = 1e-5 but never uses it, so F̂_j = 0 gives inf·0 = NaN and topk
    keeps exactly those weights. With λ > 0, F̂_j = 0 gives S_j = ½·λ·θ_j² (finite, magnitude-ordered).
    """
    o = ctx.options
    st = mean_gradient(ctx, need_sq=True)
    c = _c_b(o)
    if o.damp_mode == "relative":
        total = sum(float((c * st.sq[p.name])[ctx.masks[p.name]].double().sum()) for p in ctx.params)
        alive = sum(int(ctx.masks[p.name].sum()) for p in ctx.params)
        mean = total / alive if alive else 0.0
        lam = o.damp * mean if mean > 0 else o.damp
    else:
        lam = o.damp
    out = {}
    for p in ctx.params:
        h = c * st.sq[p.name] + lam
        out[p.name] = 0.5 * h * (p.tensor.detach() - st.mean[p.name] / h) ** 2
    return out
