"""Pass 1 of an OBS step (:func:`obs_statistics`): the block layout, the memory plan, the gradient matrix G and per
block diag(F⁻¹) (and h = F⁻¹∇L for WoodTaylor) through the inverse engines; hands over to :mod:`.streamed` when the
planner streams the Fisher."""
from __future__ import annotations

import torch
from torch import nn

from ... import distributed
from ...errors import PrunekitError
from ...modes import model_device
from ...registry import ScoreContext
from . import planner as _planner
from .blocks import make_layout
from .engines import block_factor
from .gradients import gradient_matrix, per_example_activation_bytes
from .options import OBSOptions
from .state import F64, OBSState, _col_mean, _finish_statistics, _taylor_terms, log
from .streamed import _streamed_statistics


def _devices(o: OBSOptions, model: nn.Module):
    mdev = model_device(model)
    cdev = torch.device(o.compute_device) if o.compute_device else mdev
    gdev = torch.device(o.grad_device) if o.grad_device else mdev
    fdev = torch.device(o.factor_device) if o.factor_device else cdev
    return mdev, gdev, cdev, fdev


def _activation_bytes(model: nn.Module) -> int:
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return 0
    p = next(model.parameters())
    try:
        return per_example_activation_bytes(model, torch.zeros(1, *shape, dtype=p.dtype, device=p.device))
    except Exception:  # noqa: BLE001 - an estimate only
        return 0


def damping(o: OBSOptions) -> float:
    return float(o.fisher_damp) + (float(o.weight_decay) if o.effective_damp else 0.0)


def obs_statistics(ctx: ScoreContext, *, taylor: bool, dynamic: bool, G: torch.Tensor | None = None) -> OBSState:
    """Pass 1 of a step: G, the layout, diag(F⁻¹) per block (and h = F⁻¹∇L for WoodTaylor), factors cached when the
    memory planner allows. ``G``: a precomputed gradient matrix (benchmarks), columns as the layout's."""
    o = ctx.options
    model, params = ctx.model, ctx.params
    lam = damping(o)
    mdev, gdev, cdev, fdev = _devices(o, model)
    masks = [ctx.masks[p.name] for p in params]
    layout = make_layout(masks, blocks=o.blocks, block_size=o.block_size, dynamic=dynamic)
    if layout.skipped:
        log.info("OBS: %d tensor(s) have no active weight and are skipped (collapsed)", len(layout.skipped))
    widest = max(p.tensor.numel() for p in params)
    plan_kw = dict(widest_tensor=widest, activation_bytes=_activation_bytes(model), engine=o.engine,
                   memory_limit=o.memory_limit, grad_device=gdev, factor_device=fdev, compute_device=cdev,
                   cache=o.cache_factors, max_micro_batch=o.max_micro_batch, grad_batch=o.fisher_batch,
                   sm_parts=o.sm_parts)
    streamable = G is None and not o.centered and o.update == "sum"
    mplan = _planner.plan(layout, o.fisher_samples, streamable=streamable, **plan_kw)  # refuses before any data
    log.info(mplan.summary())
    if mplan.streamed:
        return _streamed_statistics(ctx, layout, mplan, taylor=taylor, dynamic=dynamic, masks=masks, lam=lam,
                                    devices=(gdev, cdev))
    if G is None:
        G = gradient_matrix(model, params, ctx.data, n_grads=o.fisher_samples, grad_batch=o.fisher_batch,
                            true_fisher=o.true_fisher, generator=ctx.generator, loss=ctx.loss, masks=ctx.masks,
                            active_only=dynamic, device=gdev, label_smoothing=o.hess_label_smoothing,
                            max_micro_batch=mplan.chunk_examples)
    elif G.shape[1] != layout.n_columns:
        raise PrunekitError(f"the given gradient matrix has {G.shape[1]} columns, the layout {layout.n_columns}")
    N = G.shape[0]
    if N != o.fisher_samples:
        mplan = _planner.plan(layout, N, **plan_kw)
    cols = None if layout.columns is None else layout.columns.to(cdev)
    w = torch.cat([p.tensor.detach().reshape(-1) for p in params]).to(cdev, F64)
    active = torch.cat([m.reshape(-1) for m in masks]).to(cdev)
    if cols is not None:
        w, active = w[cols], active[cols]
    gbar, h = _taylor_terms(o, ctx, model, params, cdev, cols, w, lambda: _col_mean(G).to(cdev)) if taylor \
        else (None, None)
    # DDP: the batches of blocks are shared out round robin (prunekit.distributed.owns); each rank inverts its own
    # blocks and the per-weight results are summed over the ranks (disjoint supports: the sum is exact)
    diag = torch.zeros_like(w)
    covered = torch.zeros_like(w)
    batches = layout.batches(mplan.blocks_per_batch, active=active.cpu())
    factors = []
    for i, batch in enumerate(batches):
        if not distributed.owns(i):
            factors.append(None)
            continue
        Gb = batch.gather(G, cdev)
        f = block_factor(Gb, lam, o.engine, center=o.centered, sm_parts=o.sm_parts)
        dg = f.diag(Gb)
        batch.scatter_vec(diag, dg)
        batch.scatter_vec(covered, torch.ones_like(dg))
        if taylor:
            batch.scatter_vec(h, f.apply(Gb, batch.gather_vec(gbar).unsqueeze(-1)).squeeze(-1))
        factors.append(f.to(fdev) if mplan.cache else None)
        del Gb, f
    distributed.all_sum(diag, covered, h)
    diag = torch.where(covered > 0, diag, torch.full_like(w, 1.0 / lam))
    st = OBSState(G, layout, batches, factors, diag, w, lam, taylor, gbar, h, plan=mplan, device=cdev)
    return _finish_statistics(st, o, taylor, active, N, layout, mplan, lam)
