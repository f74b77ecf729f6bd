"""The exact joint OBS solve per block (``update: joint``): δw_B = −F_B⁻¹E_Q([F⁻¹]_QQ)⁻¹·num_Q through the |Q|×|Q|
systems, batched over blocks within a memory budget."""
from __future__ import annotations

import torch

from .engines import cholesky
from .state import F64

#: Working memory of one batch of the joint update (E, X and the |Q|×|Q| systems).
JOINT_BYTES = 256 * 2**20


def _joint(f, Gb, qb, num, joint_max: int):
    """Exact joint OBS per block: δw_B = −F_B⁻¹E_Q([F⁻¹]_QQ)⁻¹·num_Q (num = w, or w − h for WoodTaylor; the
    caller adds the gradient term and σ). Returns (δ [nb, c] without σ, predicted increase, fallback mask [nb])."""
    nb, c = qb.shape
    counts = qb.sum(1)
    fallback = counts > joint_max
    use = (~fallback) & (counts > 0)
    out = torch.zeros(nb, c, dtype=F64, device=qb.device)
    pred = 0.0
    idx = torch.nonzero(use, as_tuple=True)[0]
    if idx.numel() == 0:
        return out, pred, fallback
    qmax = int(counts[idx].max())
    step = max(1, JOINT_BYTES // max(1, 3 * c * qmax * 8))
    for a in range(0, idx.numel(), step):
        j = idx[a: a + step]
        fj = f.select(j) if j.numel() != nb else f
        Gj = Gb if Gb is None or j.numel() == nb else Gb[j]
        qj, nj = qb[j], num[j]
        k = j.numel()
        pos = torch.argsort((~qj).to(torch.int8), dim=1, stable=True)[:, :qmax]  # Q positions first, in order
        valid = torch.arange(qmax, device=qb.device)[None, :] < counts[j][:, None]
        E = torch.zeros(k, c, qmax, dtype=F64, device=qb.device)
        E.scatter_(1, pos[:, None, :], valid[:, None, :].to(F64))
        X = fj.apply(Gj, E)  # F⁻¹E_Q [k, c, qmax]
        S = X.gather(1, pos[:, :, None].expand(k, qmax, qmax))  # [F⁻¹]_QQ
        vv = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(qmax, dtype=F64, device=qb.device).expand(k, qmax, qmax)
        S = torch.where(vv, S, eye)
        S = 0.5 * (S + S.transpose(1, 2))
        rhs = torch.where(valid, nj.gather(1, pos), torch.zeros(k, qmax, dtype=F64, device=qb.device))
        L = cholesky(S, qmax, "[F⁻¹]_QQ")
        z = torch.cholesky_solve(rhs.unsqueeze(-1), L)
        out[j] = torch.bmm(X, z).squeeze(-1)
        pred += 0.5 * float((rhs.unsqueeze(-1) * z).sum())
    return out, pred, fallback
