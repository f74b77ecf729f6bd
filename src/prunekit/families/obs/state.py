"""What pass 1 of an OBS step leaves for pass 2 (:class:`OBSState`), and the steps both routes of pass 1 share (the
stored gradient matrix of :mod:`.statistics`, the streamed Fisher of :mod:`.streamed`): WoodTaylor's gradient
terms, the column means of G, and ρ with the step's report from the block diagonals."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .blocks import BlockBatch, BlockLayout
from .gradients import mean_gradient

log = logging.getLogger("prunekit.obs")
F64 = torch.float64


@dataclass
class OBSState:
    """What the score leaves for the update (one pruning step)."""

    G: torch.Tensor | None  # None for a streamed Fisher (the cached factors hold the block inverses)
    layout: BlockLayout
    batches: list[BlockBatch]
    factors: list[Any]  # cached factor per batch (None: recompute)
    diag: torch.Tensor  # [n_columns] float64, [F⁻¹]_qq
    w: torch.Tensor  # [n_columns] float64
    lam: float
    taylor: bool
    gbar: torch.Tensor | None = None  # ∇L per column
    h: torch.Tensor | None = None  # F⁻¹∇L per column
    rho: torch.Tensor | None = None
    constant: float = 0.0
    n_grads: int = 0  # N, the gradients behind the Fisher
    plan: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: dict = field(default_factory=dict)


def _finish_statistics(st: OBSState, o, taylor: bool, active: torch.Tensor, N: int, layout: BlockLayout, mplan,
                       lam: float) -> OBSState:
    """ρ (and WoodTaylor's constant) from the state's diag, w and h; the step's numbers in ``st.report``."""
    w, h = st.w, st.h
    if taylor:
        st.constant = -0.5 * float((st.gbar * h).sum())
        if o.normalize_hgp:
            nrm = float(h.norm())
            if nrm > 0:
                st.h = h / nrm
    num = w - st.h if taylor else w
    rho = num.square() / (2.0 * st.diag)
    if taylor and o.woodtaylor_abs:
        rho = (rho + st.constant).abs()
    st.rho = torch.where(active, rho, torch.zeros_like(rho))
    st.n_grads = N
    st.report.update(n_grads=N, layout=layout.describe(), plan=mplan.summary(), lam=lam)
    if taylor:
        log.info("WoodTaylor: constant term -½·∇ᵀF⁻¹∇ = %.6g (same for every weight, not ranked)", st.constant)
    return st


def _col_mean(G: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    out = torch.empty(G.shape[1], dtype=F64, device=G.device)
    for a in range(0, G.shape[1], chunk):
        out[a: a + chunk] = G[:, a: a + chunk].to(F64).mean(0)
    return out


def _taylor_terms(o, ctx, model, params, cdev, cols, w, gradient_mean):
    """WoodTaylor's (ḡ, h): ḡ the mean gradient over ``grad_samples`` examples when set, else
    ``gradient_mean()`` (the mean of the Fisher's own gradients: stored or streamed); h the zero accumulator."""
    if o.grad_samples is not None:
        gfull = mean_gradient(model, params, ctx.data, n_examples=o.grad_samples, loss=ctx.loss,
                              masks=ctx.masks, label_smoothing=o.hess_label_smoothing).to(cdev)
        gbar = gfull if cols is None else gfull[cols]
    else:
        gbar = gradient_mean()
    return gbar, torch.zeros_like(w)
