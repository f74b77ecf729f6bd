"""The per-weight sensitivity kernels of seed 002 (methods/sensitivity.md §2), shared by SiPP and PFP: the
reciprocals r = 1/|z±| of the positive and negative pre-activation parts, and the max-product and max-mean
reductions g_ij = |w_ij|·max over the rows of r·a (or of the position mean), in bounded blocks."""
from __future__ import annotations

import torch

#: |z| at or below this is treated as 0 (the denominator becomes infinite and g = 0), whatever the model's dtype.
EPS = float(torch.finfo(torch.float32).eps)
#: Elements of the temporary tensors formed at once by the sensitivity kernels.
BLOCK_ELEMS = 1 << 22


def reciprocal(z: torch.Tensor) -> torch.Tensor:
    """|1/z|, and 0 where |z| ≤ eps (an infinite denominator) or z is NaN: 1/|z| where |z| > eps, computed in place
    on a fresh |z| (the same values as ``where(|z| > eps, 1/clamp(|z|, eps), 0)``, in fewer passes)."""
    az = z.abs()
    small = ~(az > EPS)
    return az.reciprocal_().masked_fill_(small, 0.0)


def max_product(r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """max over rows R of r[R, i]·a[R, j] -> (I, J), for nonnegative r (R, I) and a (R, J), in bounded blocks."""
    R, I = r.shape
    J = a.shape[1]
    out = torch.zeros((I, J), dtype=a.dtype, device=a.device)
    ic = min(I, max(1, BLOCK_ELEMS // max(J, 1)))
    rb = max(1, BLOCK_ELEMS // (ic * max(J, 1)))
    for i0 in range(0, I, ic):
        acc = out[i0:i0 + ic]
        for r0 in range(0, R, rb):
            blk = r[r0:r0 + rb, i0:i0 + ic, None] * a[r0:r0 + rb, None, :]
            torch.maximum(acc, blk.amax(0), out=acc)
    return out


def _max_mean(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """max over examples n of (1/P)·Σ_p r[n, i, p]·a[n, j, p] -> (I, J): one batched matmul per block."""
    n, J, P = a.shape
    I = r.shape[1]
    out = torch.zeros((I, J), dtype=a.dtype, device=a.device)
    nb = max(1, BLOCK_ELEMS // max(I * J, 1))
    for n0 in range(0, n, nb):
        blk = torch.bmm(r[n0:n0 + nb], a[n0:n0 + nb].transpose(1, 2))
        torch.maximum(out, blk.amax(0), out=out)
    return out / P


def relative_contributions(w: torch.Tensor, a: torch.Tensor, aggregate: str) -> torch.Tensor:
    """max over the examples of ``a`` of g_ij aggregated over positions (section 2 fast paths).

    ``w``: (I, J) weights of one group; ``a``: (n, J, P) nonnegative patches. ``aggregate``: ``mean`` or ``max`` over
    the P positions. Result (I, J) in [0, 1]."""
    n, J, P = a.shape
    I = w.shape[0]
    pos, neg = w > 0, w < 0
    rp = reciprocal(torch.einsum("ij,njp->nip", w.clamp(min=0), a))
    rn = reciprocal(torch.einsum("ij,njp->nip", w.clamp(max=0), a))
    if aggregate == "mean" and P > 1:
        mp, mn = _max_mean(a, rp), _max_mean(a, rn)
    else:  # max over positions then over examples = max over the n·P rows (MAX fast path; P = 1: mean = max)
        ar = a.permute(0, 2, 1).reshape(n * P, J)
        mp = max_product(rp.permute(0, 2, 1).reshape(n * P, I), ar)
        mn = max_product(rn.permute(0, 2, 1).reshape(n * P, I), ar)
    g = w.abs() * torch.where(pos, mp, torch.where(neg, mn, torch.zeros_like(mp)))
    return g.clamp_(max=1.0)
