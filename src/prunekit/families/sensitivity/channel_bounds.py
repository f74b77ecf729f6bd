"""PFP's channel sensitivities without forming every per-weight sensitivity (seed 002, methods/sensitivity.md §3).

PFP ranks the input channels of a layer by s_c = max over output neurons i and the k entries j of channel c of
g_ij = min(1, |w_ij|·max_R r[R, i]·a[R, j]), with r = 1/|z±| (the sign of w_ij picks z+ or z−), a the
nonnegative input patches and R the rows (example × position). :func:`channel_contributions` computes exactly
these maxima (bitwise those of :func:`prunekit.families.sensitivity.kernels.relative_contributions` reduced per
channel) while skipping every product that cannot raise a channel's running maximum:

- an entry's g is at most U_ij = min(1, |w_ij|·max_R r[R, i]·max_R a[R, j]); entries whose U does not beat
  their channel's maximum so far are skipped; both signs are handled in one pass (an entry reads the r of its
  weight's sign), so the entries of either sign raise the maxima for the other;
- the largest bounds are computed first (a few entries per channel, doubling for a few rounds), so the maxima
  rise before the bulk of the entries is checked;
- an entry is computed only over the rows that can still raise its channel: the rows are cut into blocks of
  ROW_BLOCK and those into SUB_BLOCKS sub-blocks; a block whose bound |w_ij|·max r·max a over the block beats the
  maximum is checked sub-block by sub-block with the same bound, and only the sub-blocks that still beat it are
  multiplied out row by row.

Max and float rounding are monotone (fl(x·y) ≤ fl(x'·y') when 0 ≤ x ≤ x' and 0 ≤ y ≤ y'), and every value
that enters a maximum is the same float product as in the per-weight path, so the result is bitwise that path's.
On the CPU the pre-activations z± are one matrix product each with the patches laid out (input, row)
(:func:`prunekit.families.sensitivity.scores.patch_rows`, the layout the bounds read anyway), the product the
per-weight path's ``einsum`` forms after copying the patches to that layout (the same values, checked by
tests/methods/sensitivity/test_pfp_kernels.py); elsewhere that ``einsum``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import BLOCK_ELEMS, max_product, reciprocal

#: Rows per block of the block bounds of :func:`channel_contributions`.
ROW_BLOCK = 64
#: Sub-blocks per block: a block whose bound beats a channel's maximum is checked sub-block by sub-block.
SUB_BLOCKS = 4
#: Entries per channel computed exactly in the first refinement round of :func:`channel_contributions` (doubling
#: each round), and the rounds before every remaining entry is computed.
FIRST_PICKS, PICK_ROUNDS = 4, 6


def scatter_max(best: torch.Tensor, channel: torch.Tensor, values: torch.Tensor) -> None:
    """best[c] = max(best[c], values of the entries of channel c), in place."""
    if values.numel():
        best.scatter_reduce_(0, channel, values.to(best.dtype), "amax")


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """(X, R) -> (X, nb, ROW_BLOCK), zero padded at the end of R when needed."""
    X, R = t.shape
    nb = -(-R // ROW_BLOCK)
    if nb * ROW_BLOCK != R:
        t = F.pad(t, (0, nb * ROW_BLOCK - R))
    return t.reshape(X, nb, ROW_BLOCK)


class _Rows:
    """r (I, R) and a (J, R), cut into blocks of ROW_BLOCK rows and those into SUB_BLOCKS sub-blocks, with the
    maximum of each block and of each sub-block."""

    def __init__(self, r: torch.Tensor, a: torch.Tensor, ab: torch.Tensor, asb: torch.Tensor):
        self.r, self.a, self.ab, self.asb = r, a, ab, asb   # (I, nb, B), (J, nb, B), (J, nb), (J·nb, S)
        self.nb = r.shape[1]
        self.rsb = sub_maxima(r)                             # (I·nb, S)
        self.rb = self.rsb.view(r.shape[0], self.nb, SUB_BLOCKS).amax(2)   # (I, nb)

    def exact(self, fi: torch.Tensor, fj: torch.Tensor, wf: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
        """min(1, wf·max_R r[R, i]·a[R, j]) for the entries (fi, fj), over the sub-blocks whose bound
        min(1, wf·max r·max a) exceeds ``floor`` (the entry's channel maximum so far; blocks first, then their
        sub-blocks); entries whose every sub-block is below it get 0 (they cannot raise the maximum)."""
        out = torch.zeros(fi.numel(), dtype=self.r.dtype, device=self.r.device)
        nb, S = self.nb, SUB_BLOCKS
        rows = ROW_BLOCK // S
        r_sub, a_sub = self.r.view(-1, rows), self.a.view(-1, rows)   # (X·nb·S, rows)
        step = max(1, BLOCK_ELEMS // (4 * nb))
        chunk = BLOCK_ELEMS // ROW_BLOCK
        for f0 in range(0, fi.numel(), step):
            i, j, w, fl = fi[f0:f0 + step], fj[f0:f0 + step], wf[f0:f0 + step], floor[f0:f0 + step]
            bound = (w[:, None] * (_rows(self.rb, i) * _rows(self.ab, j))).clamp_(max=1.0)
            e, b = torch.nonzero(bound > fl[:, None], as_tuple=True)
            for e0 in range(0, e.numel(), chunk):
                ee, bb = e[e0:e0 + chunk], b[e0:e0 + chunk]
                li, lj, we = i[ee] * nb + bb, j[ee] * nb + bb, w[ee]
                sub = (we[:, None] * (_rows(self.rsb, li) * _rows(self.asb, lj))).clamp_(max=1.0)
                e2, s2 = torch.nonzero(sub > fl[ee][:, None], as_tuple=True)
                prod = _rows(r_sub, li[e2] * S + s2) * _rows(a_sub, lj[e2] * S + s2)
                vals = (we[e2] * prod.amax(1)).clamp_(max=1.0)
                out[f0:f0 + step].scatter_reduce_(0, ee[e2], vals, "amax")
        return out


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` for a 1-D ``index`` (index_select: about twice as fast as advanced indexing on the CPU)."""
    return torch.index_select(t, 0, index)


def sub_maxima(blocks: torch.Tensor) -> torch.Tensor:
    """(X, nb, ROW_BLOCK) -> (X·nb, SUB_BLOCKS): the maximum of each sub-block of ROW_BLOCK / SUB_BLOCKS rows
    (a max pooling: faster than a reduction over a short last dim, the same values)."""
    X, nb, B = blocks.shape
    rows = B // SUB_BLOCKS
    return F.max_pool1d(blocks.reshape(1, X, nb * B), rows, rows).view(X * nb, SUB_BLOCKS)


def _pre_activations(ws: torch.Tensor, a: torch.Tensor | None, at: torch.Tensor) -> torch.Tensor:
    """z = ws·a as (I, R), rows in (example, position) order. On the CPU (or without ``a``) one ``mm`` with ``at``
    (J, R): the product that ``einsum('ij,njp->nip')`` forms after copying ``a`` to that layout (the same values,
    checked by tests/methods/sensitivity/test_pfp_fast.py); elsewhere that ``einsum``, as the per-weight path."""
    if a is None or at.device.type == "cpu":
        return torch.mm(ws, at)
    z = torch.einsum("ij,njp->nip", ws, a)
    return z.permute(1, 0, 2).reshape(ws.shape[0], -1)


def channel_contributions(w: torch.Tensor, a: torch.Tensor, k: int, best: torch.Tensor,
                          alive: torch.Tensor | None = None) -> None:
    """``best[c] = max(best[c], max over i and the k entries j of input channel c of g_ij)``, in place, for the
    MAX aggregation: exactly ``(relative_contributions(w, a, "max") * alive).view(I, C, k).amax((0, 2))`` (the same
    float products; dead entries (``alive`` 0) give 0), without forming every g_ij.

    ``w``: (I, C·k); ``a``: (n, C·k, P) nonnegative patches; ``best`` (C,) holds a running maximum (e.g. of
    earlier chunks). Entries (of both signs at once) whose bound U cannot beat their channel's maximum are
    skipped; rounds compute the live entries of largest U in each channel (4, then 8, 16, ...) exactly, the
    maxima rise, the live set shrinks; then every live entry is computed over the blocks of rows that can still
    raise its channel (see the module docstring)."""
    n, J, P = a.shape
    channel_contributions_rows(w, a.permute(1, 0, 2).reshape(J, n * P), k, best, alive, a=a)


def channel_contributions_rows(w: torch.Tensor, at: torch.Tensor, k: int, best: torch.Tensor,
                               alive: torch.Tensor | None = None, a: torch.Tensor | None = None) -> None:
    """:func:`channel_contributions` with the patches given as ``at`` (C·k, R): one row per input entry, the
    columns (example, position) (:func:`prunekit.families.sensitivity.scores.patch_rows`); ``a``: the same patches
    as (n, C·k, P), used off the CPU for the pre-activations (None: ``mm`` everywhere)."""
    J, R = at.shape
    I = w.shape[0]
    C = J // k
    if R * I * J <= BLOCK_ELEMS:  # small: every g_ij
        for ws, sign in ((w.clamp(min=0), w > 0), (w.clamp(max=0), w < 0)):
            W = w.abs() * sign
            if alive is not None:
                W = W * alive
            g = (W * max_product(reciprocal(_pre_activations(ws, a, at)).t(), at.t())).clamp_(max=1.0)
            torch.maximum(best, g.view(I, C, k).amax(dim=(0, 2)), out=best)
        return
    # both signs at once: entry (i, j) reads row i of the reciprocals of z+, or row I + i (those of z−) if w_ij < 0
    r = reciprocal(torch.cat([_pre_activations(w.clamp(min=0), a, at), _pre_activations(w.clamp(max=0), a, at)]))
    neg = w < 0
    W = w.abs()   # w = 0: W = 0, U = 0, never live (g = 0)
    if alive is not None:
        W = W * alive
    r_max = r.amax(1)
    U = (W * (torch.where(neg, r_max[I:, None], r_max[:I, None]) * at.amax(1)[None, :])).clamp_(max=1.0)
    a_blocks = _blocks(at)
    asb = sub_maxima(a_blocks)
    rows = _Rows(_blocks(r), a_blocks, asb.view(J, -1, SUB_BLOCKS).amax(2), asb)
    del r
    # channel-major (C, I·k): entry t of channel c is (i, j) = (t // k, c·k + t % k); an entry is live while its
    # bound beats its channel's maximum (best >= 0, so a live entry has W > 0); computed entries are set to -1
    V = U.view(I, C, k).permute(1, 0, 2).reshape(C, I * k)
    del U
    c_idx = torch.arange(C, device=w.device)[:, None]

    def compute(c: torch.Tensor, t: torch.Tensor) -> None:
        fi, fj = t // k, c * k + t % k
        scatter_max(best, c, rows.exact(fi + I * neg[fi, fj], fj, W[fi, fj], best[c]))

    picks = FIRST_PICKS
    for _ in range(PICK_ROUNDS):
        n_live = int(torch.count_nonzero(V > best[:, None]))
        if n_live * rows.nb <= BLOCK_ELEMS // 8 or picks >= I * k:
            break
        val, t = torch.topk(V, min(picks, I * k), dim=1)
        c = c_idx.expand_as(t)
        keep = val > best[:, None]  # live entries only
        c, t = c[keep], t[keep]
        compute(c, t)
        V[c, t] = -1.0
        picks *= 2
    c, t = torch.nonzero(V > best[:, None], as_tuple=True)
    if c.numel():
        compute(c, t)
