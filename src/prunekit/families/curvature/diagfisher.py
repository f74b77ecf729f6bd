"""``diagfisher`` (seed 003, second_order.md §7): ½·w²·F_qq with the diagonal empirical Fisher from
per-example gradients; no update."""
from __future__ import annotations


from dataclasses import dataclass

import torch

from ...gradstats.frontend import grad_stats
from ...modes import model_device
from ...registry import ScoreContext, register


from .common import check_positive, first_examples, float_dtype

# -------------------------------------------------------------------------------------------------- diagfisher


@dataclass(frozen=True)
class DiagFisherOptions:
    """``diag_fisher_samples``: N_d examples (the first ones of ``data``), one per-example gradient each (b = 1);
    this baseline ignores ``fisher_samples``."""

    diag_fisher_samples: int = 4096

    def validate(self, path, error) -> None:
        check_positive(error, diag_fisher_samples=self.diag_fisher_samples)


@register("diagfisher", family="second-order baseline (diagonal Fisher)", needs_data="labels",
          options=DiagFisherOptions, sources=("003",), dict_batches=True,
          summary="½·w²·F_qq, diagonal empirical Fisher from per-example gradients (no damping, no update)")
def diagfisher(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """S = ½·w_q²·F_qq with F_qq = (1/N_d)·Σ_n (m ⊙ g_n)_q², g_n the gradient of example n's loss (true labels, eval
    mode), accumulated on the fly and vectorized (:func:`prunekit.gradstats.grad_stats`, batch_size=1). It is
    WoodFisher's ρ with a diagonal F in the limit λ → 0, without update. The reference adds 1e-4 to the score (a
    constant: no ranking changes); prunekit adds nothing."""
    o = ctx.options
    dev = model_device(ctx.model)
    data = first_examples(ctx.data, o.diag_fisher_samples, "diagfisher", "diag_fisher_samples", 256, dev,
                           float_dtype(ctx.model))
    st = grad_stats(ctx.model, ctx.params, data, loss=ctx.loss, batch_size=1, need_sq=True)
    out = {}
    for p in ctx.params:
        m = ctx.masks[p.name].to(torch.bool)
        fq = torch.where(m, st.sq[p.name], torch.zeros_like(st.sq[p.name]))
        out[p.name] = 0.5 * p.tensor.detach().to(fq.dtype) ** 2 * fq
    return out
