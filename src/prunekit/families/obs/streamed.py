"""The streamed-Fisher route of pass 1 (the planner's choice when G does not fit but the block inverses do): the
gradients are read a chunk at a time and folded into each block's inverse F_B⁻¹ by the rank-k Woodbury identity;
G is never stored."""
from __future__ import annotations

import warnings

import torch

from ... import distributed
from ...batches import BatchStream
from ...errors import PrunekitError
from ...modes import model_device
from ...registry import ScoreContext
from .blocks import BlockLayout
from .engines import ShermanMorrisonFactor, cholesky
from .gradients import gradient_matrix
from .state import F64, OBSState, _col_mean, _finish_statistics, _taylor_terms


def _example_chunks(stream: BatchStream, n: int):
    """The next ``n`` examples of ``stream`` (fewer at the end of the data), as (inputs, targets) pieces."""
    got = 0
    while got < n and (piece := stream.take(n - got)) is not None:
        got += piece[0].shape[0]
        yield piece


def _streamed_statistics(ctx: ScoreContext, layout: BlockLayout, mplan, *, taylor: bool, dynamic: bool,
                         masks: list[torch.Tensor], lam: float, devices) -> OBSState:
    """Pass 1 without a stored G (planner: streamed Fisher, the oBERT recipe): the gradients ``stream_rows`` at a
    time, each block's inverse F_B⁻¹ (from I/λ) updated by the rank-k Woodbury identity
    F⁻¹ ← F⁻¹ − V(N·I + G_B V)⁻¹Vᵀ, V = F⁻¹G_Bᵀ, i.e. exactly the inverse of λI + G_BᵀG_B/N. The inverses are the
    cached Sherman–Morrison factors of the update; WoodTaylor's ∇L is the mean of the streamed gradients
    (``grad_samples`` reads the data again)."""
    o = ctx.options
    model, params = ctx.model, ctx.params
    gdev, cdev = devices
    N, k = o.fisher_samples, mplan.stream_rows
    cols = None if layout.columns is None else layout.columns.to(cdev)
    w = torch.cat([p.tensor.detach().reshape(-1) for p in params]).to(cdev, F64)
    active = torch.cat([m.reshape(-1) for m in masks]).to(cdev)
    if cols is not None:
        w, active = w[cols], active[cols]
    batches = layout.batches(mplan.blocks_per_batch, active=active.cpu())
    finv = []
    for batch in batches:
        f = torch.zeros(batch.count, batch.size, batch.size, dtype=F64, device=cdev)
        f.diagonal(dim1=-2, dim2=-1).fill_(1.0 / lam)
        finv.append(f)
    fro2 = [torch.zeros(batch.count, dtype=F64, device=cdev) for batch in batches]
    gsum = torch.zeros(layout.n_columns, dtype=F64, device=cdev) if taylor else None
    fdtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), None)
    stream = BatchStream(ctx.data, model_device(model), fdtype, who="the OBS family")
    rows = 0
    while rows < N:
        want = min(k, N - rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a short last chunk is reported once below
            try:
                Gk = gradient_matrix(model, params, _example_chunks(stream, want * o.fisher_batch), n_grads=want,
                                     grad_batch=o.fisher_batch, loss=ctx.loss, masks=ctx.masks,
                                     active_only=dynamic, device=gdev, label_smoothing=o.hess_label_smoothing,
                                     max_micro_batch=mplan.chunk_examples)
            except PrunekitError:
                if rows == 0:
                    raise
                break  # the data ended on a chunk boundary
        for i, batch in enumerate(batches):
            if not distributed.owns(i):
                continue
            Gb = batch.gather(Gk, cdev).to(F64)  # [nb, k, c]
            V = torch.bmm(finv[i], Gb.transpose(1, 2))  # [nb, c, k]
            S = torch.bmm(Gb, V)
            S.diagonal(dim1=-2, dim2=-1).add_(float(N))
            L = cholesky(S, S.shape[-1], "N·I + G_B F_B⁻¹ G_Bᵀ")
            finv[i] -= torch.bmm(V, torch.cholesky_solve(V.transpose(1, 2), L))
            fro2[i] += Gb.square().sum((1, 2))
        if taylor:
            gsum += _col_mean(Gk).to(cdev) * Gk.shape[0]
        rows += Gk.shape[0]
        if Gk.shape[0] < want:
            break
        del Gk
    if rows < N:
        warnings.warn(f"data holds {rows * o.fisher_batch} examples, fewer than fisher_samples × fisher_batch = "
                      f"{N} × {o.fisher_batch}: the streamed Fisher normalizes by N = {N}; pass fisher_samples="
                      f"{rows} for the mean over the gradients read", stacklevel=4)
    factors = [ShermanMorrisonFactor.from_inverse(f, r, lam, N) for f, r in zip(finv, fro2)]
    gbar, h = _taylor_terms(o, ctx, model, params, cdev, cols, w, lambda: gsum / max(1, rows)) if taylor \
        else (None, None)
    diag = torch.zeros_like(w)
    covered = torch.zeros_like(w)
    for i, (batch, f) in enumerate(zip(batches, factors)):
        if not distributed.owns(i):
            continue
        dg = f.diag(None)
        batch.scatter_vec(diag, dg)
        batch.scatter_vec(covered, torch.ones_like(dg))
        if taylor:
            batch.scatter_vec(h, f.apply(None, batch.gather_vec(gbar).unsqueeze(-1)).squeeze(-1))
    distributed.all_sum(diag, covered, h)
    diag = torch.where(covered > 0, diag, torch.full_like(w, 1.0 / lam))
    st = OBSState(None, layout, batches, factors, diag, w, lam, taylor, gbar, h, plan=mplan, device=cdev)
    return _finish_statistics(st, o, taylor, active, N, layout, mplan, lam)
