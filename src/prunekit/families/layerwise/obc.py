"""``obc``: exact greedy OBS per row (Frantar, Singh & Alistarh 2022, "Optimal Brain Compression"), the slow
reference the fast layer-wise methods are checked against; for small layers.

Per output row w (the rows are independent: the layer-wise loss ‖WX − ŴX‖² of Eq. (1) is a sum over rows, each
with the same Hessian H = 2XXᵀ/N, dampened by ``damp``·mean(diag H)): repeatedly remove the weight p of least OBS
error w_p²/[H⁻¹]_pp, move the rest of the row by δ = −(w_p/[H⁻¹]_pp)·H⁻¹_{:,p} (Eq. (2)), and eliminate p from the
inverse Hessian by one Gaussian-elimination step, H⁻¹ ← H⁻¹ − H⁻¹_{:,p}H⁻¹_{p,:}/[H⁻¹]_pp (Eq. (3)), so that each
step is exact: after every removal the row holds the optimum of the quadratic for its current mask. Weights
pruned earlier are eliminated first (zero already, so they only shrink H⁻¹). No column order and no blocks: the
greedy choice is over every remaining weight of the row.

Budgets: exactly as ``wanda``'s rows — the layer keeps k = min(round((1 − s)·n), alive), split over its rows in
proportion to their length and capped by what is alive (:func:`~.quotas.allocate`). (The paper's global
per-layer choice across rows from the recorded traces is not implemented.) ``sequential`` as ``sparsegpt``.

Cost: O(rows·d³) time per layer (d input columns), rows in chunks of ``chunk_rows`` each holding its own d×d
inverse: layers with more than ``max_cols`` input columns are refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import PrunekitError
from ...registry import register
from .base import FAMILY
from .quotas import allocate
from .sparsegpt import SparseGPT, SparseGPTOptions


@dataclass(frozen=True)
class OBCOptions(SparseGPTOptions):
    """``obc``: ``damp`` as sparsegpt; ``max_cols``: the widest layer solved (wider ones are refused);
    ``chunk_rows``: rows solved at once (each holds a d×d inverse). ``block_size`` is not used."""

    max_cols: int = 1024
    chunk_rows: int = 64

    def validate(self, path, error) -> None:
        super().validate(path, error)
        if self.max_cols < 1 or self.chunk_rows < 1:
            raise error("obc: max_cols and chunk_rows must be >= 1")


def obc_rows(W: torch.Tensor, Hinv: torch.Tensor, alive: torch.Tensor, quota: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy exact OBS on the rows of W [r, d] with the shared inverse Hessian ``Hinv`` [d, d] of the dampened H:
    row i keeps ``quota[i]`` of its ``alive`` weights. Returns (Ŵ with exact zeros, kept mask)."""
    r, d = W.shape
    W = W.clone()
    Hi = Hinv.expand(r, d, d).clone()
    live = torch.ones_like(alive)
    rows = torch.arange(r, device=W.device)

    def eliminate(sel: torch.Tensor, p: torch.Tensor, update: bool) -> None:
        hp = Hi[sel, :, p]  # [s, d] column p of each selected row's inverse
        dp = hp[torch.arange(len(p)), p]  # [s]
        if update:
            W[sel] -= (W[sel, p] / dp)[:, None] * hp
        Hi[sel] -= hp[:, :, None] * hp[:, None, :] / dp[:, None, None]
        W[sel, p] = 0
        live[sel, p] = False

    for j in range(d):  # weights pruned earlier leave the problem first (already 0: no update)
        dead = rows[~alive[:, j]]
        if dead.numel():
            eliminate(dead, torch.full_like(dead, j), update=False)
    todo = alive.sum(1) - quota.to(W.device)
    for _ in range(int(todo.max()) if todo.numel() else 0):
        sel = rows[todo > 0]
        if not sel.numel():
            break
        diag = Hi[sel].diagonal(dim1=1, dim2=2)
        err = torch.where(live[sel], W[sel].square() / diag, torch.full_like(diag, torch.inf))
        eliminate(sel, err.argmin(1), update=True)
        todo[sel] -= 1
    return W, live


class OBC(SparseGPT):
    """``obc`` (see the module docstring). N:M patterns are not implemented (``pk.prune`` refuses them)."""

    supports_pattern = False

    def solve_group(self, ctx, group, alive, keep, pattern, scores, first) -> dict:
        o = ctx.options
        for i in group:
            L = self.layers[i]
            if L.cols > o.max_cols:
                raise PrunekitError(f"obc: {L.name!r} has {L.cols} input columns, more than max_cols={o.max_cols}: "
                                    "OBC costs O(rows·cols³) per layer; use sparsegpt, raise max_cols, or leave the "
                                    "layer out with ignore=[...]")
        Hs = self.hessians(group)
        out = {}
        for i in group:
            L = self.layers[i]
            W = L.matrices(self._dtype)
            a = alive[L.name].to(W.device)
            quota = torch.tensor(allocate(a.reshape(-1, L.cols).sum(1).tolist(), [L.cols] * (L.groups * L.rows),
                                          keep[L.name])).reshape(L.groups, L.rows)
            Wn, Kn = torch.empty_like(W), torch.empty_like(a)
            for g in range(L.groups):
                H = Hs[i][g].to(W.device).clone()
                mean = float(H.diagonal().mean())
                H.diagonal().add_(o.damp * mean if mean > 0 else o.damp)
                Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
                for r0 in range(0, L.rows, o.chunk_rows):
                    sl = slice(r0, r0 + o.chunk_rows)
                    Wn[g, sl], Kn[g, sl] = obc_rows(W[g, sl], Hinv, a[g, sl], quota[g, sl])
            del Hs[i]
            out[i] = (Kn, Wn)
        return out


register("obc", family=FAMILY, needs_data="inputs", options=OBCOptions, scope="layer", dict_batches=True,
         default_samples={"random": 128},
         summary="OBC: exact greedy OBS per row with the layer's inverse Hessian (small layers; the reference of "
                 "sparsegpt)")(OBC)
