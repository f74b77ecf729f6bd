"""Pass 2 of an OBS step (:func:`obs_update`): the weight update for the newly pruned set, block by block (summed or
joint, with WoodTaylor's gradient term), moved into the live weights and reported."""
from __future__ import annotations

import warnings

import torch

from ... import distributed
from ...batches import call, labelled_pair
from ...modes import model_device, scoring_mode
from ...registry import ScoreContext
from .blocks import BlockBatch
from .engines import block_factor
from .joint import _joint
from .options import OBSOptions
from .state import F64, OBSState, log


def obs_update(ctx: ScoreContext, st: OBSState, before: dict, after: dict) -> None:
    """Pass 2: move the live weights by the OBS update for Q = before & ~after (module docs), with the statistics
    ``st`` of pass 1; the step's numbers go to ``st.report``. Runs under no_grad."""
    o = ctx.options
    dev = st.device
    q_full = torch.cat([(before[p.name] & ~after[p.name]).reshape(-1) for p in ctx.params]).to(dev)
    cols = None if st.layout.columns is None else st.layout.columns.to(dev)
    Q = q_full if cols is None else q_full[cols]
    if not bool(Q.any()) and not st.taylor:
        return
    # counted once over the ranks (summed below)
    predicted = float(st.rho[Q].sum()) if o.update == "sum" and distributed.is_main() else 0.0
    with torch.no_grad():
        delta, predicted, fell_back = _block_deltas(st, o, Q, predicted)
    distributed.all_sum(delta)
    predicted, fell_back = distributed.sum_int(predicted), distributed.sum_int(fell_back)
    if fell_back:
        warnings.warn(f"update: joint: {fell_back} block(s) have more than joint_max={o.joint_max} newly pruned "
                      "weights; they use the summed update", stacklevel=3)
    if o.normalize_update:
        nd, nw = float(delta.norm()), float(st.w.norm())
        if nw > 0 and nd > o.update_mult * nw:
            delta *= o.update_mult * nw / nd
    if cols is not None:
        full = torch.zeros(q_full.numel(), dtype=F64, device=dev)
        full[cols] = delta
    else:
        full = delta
    loss_before = _subset_loss(ctx, st) if o.log_loss_change else None
    _move_weights(ctx.params, full, before, after, zero=o.zero_after_prune or o.log_loss_change)
    _report_update(ctx, st, predicted, int(Q.sum()), float(delta.norm()), loss_before)


def _block_deltas(st: OBSState, o: OBSOptions, Q: torch.Tensor, predicted: float) -> tuple[torch.Tensor, float, int]:
    """δw over the columns from the batches of blocks this rank owns (DDP: the owner of a batch updates it; the caller
    sums over the ranks), ``predicted`` with each block batch's predicted increase added in turn, and the number of
    blocks where ``update: joint`` fell back to the summed update. Without WoodTaylor only the blocks meeting Q move."""
    delta = torch.zeros_like(st.w)
    fell_back = 0
    for i, batch in enumerate(st.batches):
        if not distributed.owns(i):
            continue
        qb = batch.gather_vec(Q)
        has = qb.any(1)
        if not st.taylor and not bool(has.any()):
            continue
        sub = batch
        keep = None
        if not st.taylor and not bool(has.all()):
            keep = torch.nonzero(has, as_tuple=True)[0]
            sub = BlockBatch(batch.size, [batch.starts[j] for j in keep.tolist()])
            qb = qb[keep]
        Gb = None if st.G is None else sub.gather(st.G, st.device)
        f = st.factors[i]
        if f is not None:  # cached in pass 1 (for every block of the batch)
            f = (f if keep is None else f.select(keep.cpu())).to(st.device)
        else:
            f = block_factor(Gb, st.lam, o.engine, center=o.centered, sm_parts=o.sm_parts)
        if o.update == "joint":
            d, predicted, fb = _joint_delta(st, o, sub, f, Gb, qb, predicted)
            fell_back += fb
        else:
            num, db = _numerators(st, sub)
            coef = torch.where(qb, num / db, torch.zeros_like(num))
            d = -float(o.scale_prune_update) * _inverse_times(st, sub, f, Gb, coef)
        sub.scatter_vec(delta, d, add=True)
        del Gb, f
    return delta, predicted, fell_back


def _numerators(st: OBSState, sub: BlockBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(w − h for WoodTaylor, else w; [F⁻¹]_qq) on the blocks of ``sub``."""
    wb, db = sub.gather_vec(st.w), sub.gather_vec(st.diag)
    hb = sub.gather_vec(st.h) if st.taylor else None
    num = wb - hb if st.taylor else wb
    return num, db


def _inverse_times(st: OBSState, sub: BlockBatch, f, Gb: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """F_B⁻¹(coef + ∇L_B) for WoodTaylor, F_B⁻¹·coef otherwise, per block of ``sub``."""
    V = coef + sub.gather_vec(st.gbar) if st.taylor else coef
    return f.apply(Gb, V.unsqueeze(-1)).squeeze(-1)


def _joint_delta(st: OBSState, o: OBSOptions, sub: BlockBatch, f, Gb: torch.Tensor, qb: torch.Tensor,
                 predicted: float) -> tuple[torch.Tensor, float, int]:
    """``update: joint`` on one batch of blocks: the exact joint solution where |Q∩B| ≤ joint_max, the summed update
    on the others, plus the gradient term for WoodTaylor. Returns (δw of the batch, ``predicted`` with this batch's
    increase added, the number of blocks that fell back to the summed update)."""
    num, db = _numerators(st, sub)
    dq, pred, fb = _joint(f, Gb, qb, num, o.joint_max)
    predicted += pred
    coef = torch.where(qb & fb[:, None], num / db, torch.zeros_like(num))
    if bool(fb.any()) or st.taylor:
        dq = dq + _inverse_times(st, sub, f, Gb, coef)
        if bool(fb.any()):
            predicted += float(sub.gather_vec(st.rho)[qb & fb[:, None]].sum())
    return -float(o.scale_prune_update) * dq, predicted, int(fb.sum())


def _move_weights(params, full: torch.Tensor, before: dict, after: dict, *, zero: bool) -> None:
    """Adds δw (flat over all prunable tensors) to the live tensors; ``zero``: writes exact zeros at the newly pruned
    weights."""
    with torch.no_grad():
        off = 0
        for p in params:
            t = p.tensor
            n = t.numel()
            t.add_(full[off: off + n].reshape(t.shape).to(t.device, t.dtype))
            if zero:
                t.masked_fill_((before[p.name] & ~after[p.name]).to(t.device), 0.0)
            off += n


def _report_update(ctx: ScoreContext, st: OBSState, predicted: float, newly_pruned: int, update_norm: float,
                   loss_before: float | None) -> None:
    """The step's numbers into ``st.report`` and the log (the measured loss change with ``log_loss_change``)."""
    st.report.update(predicted_increase=predicted, newly_pruned=newly_pruned, update_norm=update_norm)
    if st.taylor:
        st.report["constant"] = st.constant
    if loss_before is not None:
        loss_after = _subset_loss(ctx, st)
        st.report.update(loss_before=loss_before, loss_after=loss_after)
        log.info("OBS step: predicted loss increase %.6g, measured %.6g on the Fisher subset", predicted,
                 loss_after - loss_before)
    else:
        log.info("OBS step: %d weights pruned, predicted loss increase %.6g", newly_pruned, predicted)


def _subset_loss(ctx: ScoreContext, st: OBSState) -> float:
    """Mean loss over the Fisher subset (the first N·b examples), eval mode, no grad."""
    o = ctx.options
    want = st.n_grads * o.fisher_batch
    dev = model_device(ctx.model)
    total, got = 0.0, 0
    with scoring_mode(ctx.model, "eval"), torch.no_grad():
        for batch in ctx.data:
            if got >= want:
                break
            x, y = labelled_pair(batch)
            x, y = x[: want - got].to(dev), y[: want - got].to(dev)
            total += float(ctx.loss(call(ctx.model, x), y)) * x.shape[0]
            got += x.shape[0]
    return total / max(1, got)
