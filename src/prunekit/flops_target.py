"""Prune to a FLOPs target (seed 003, second_order.md §6): one OBS step whose global sparsity is bisected until the
masked model's MACs come within ``flops_epsilon`` of the target, built on the one pruning step
(:class:`prunekit.prune.PruningStep`), so it gets every check :func:`prunekit.prune` makes."""
from __future__ import annotations

import warnings
from typing import Callable

from torch import nn

from .errors import PrunekitError
from .families.obs.woodfisher import FlopsOptions
from .flops import layer_positions, macs
from .masks import Masks
from .prune import PruningStep
from .registry import get_method


def prune_to_flops(model: nn.Module, target_mflops: float | None = None, data=None, *, masks: Masks | None = None,
                   loss=None, method: str = "woodfisherblock_flops", scope: str = "global", **options) -> Masks:
    """One OBS step that meets a FLOPs target (§6): prune ``model`` in place so that its masked MACs per example
    (:mod:`prunekit.flops`, in millions) come within ``flops_epsilon`` of ``target_mflops`` (default: the
    ``flops_target`` option), and return the :class:`Masks`.

    The statistics (G, factors, ρ, optionally FLOPs-reweighted by ``flops_power``) are computed ONCE; the global
    sparsity is bisected in [current, ``max_sparsity``] (at most 50 iterations) on masks alone, FLOPs counted
    analytically; then ONE OBS update is applied for the chosen mask. If the current model is already at or below
    the target, nothing changes. If even ``max_sparsity`` stays above the target (dense non-prunable layers), the
    step stops there with a warning. When the bisection cannot get within ε (granularity), the sparsity whose FLOPs
    are closest to the target is used (reported in ``masks.report``). ``options``: the method's options and the
    common prune options (``seed``, ``exclude``, ``modules``, ...).
    """
    if not issubclass(get_method(method).options, FlopsOptions):
        raise PrunekitError(f"prune_to_flops needs an OBS code with FLOPs options (woodfisherblock_flops), got "
                            f"{get_method(method).name!r}")
    step = PruningStep(model, method, data, masks, loss, {"scope": scope, **options})
    info, common, o, masks = step.info, step.common, step.options, step.masks
    target = o.flops_target if target_mflops is None else float(target_mflops)
    if target is None:
        raise PrunekitError("prune_to_flops needs a target: pass target_mflops= or flops_target=")
    if data is None:
        raise PrunekitError(f"method {info.name!r} needs data: pass data= an iterable of (inputs, targets) batches")
    layers = layer_positions(model, o.input_shape)
    names = {p.name: p.module_name for p in masks.params if p.attr == "weight"}

    def mflops(m: dict) -> float:
        return macs(layers, {names[n]: int(v.sum()) for n, v in m.items() if n in names}) / 1e6

    current = masks.as_dict()
    f_cur = mflops(current)
    s_cur = masks.sparsity()
    report = {"method": info.name, "scope": common.scope, "target_mflops": target, "mflops_before": f_cur}
    if f_cur <= target:
        masks.report = {**report, "mflops": f_cur, "sparsity": s_cur, "achieved_sparsity": s_cur, "skipped": True,
                        "collapsed": masks.collapsed()}
        return masks
    step.check_data(1)
    ctx, scores = step.score(1)
    s_chosen, chosen, f_chosen, iters = _bisect_flops(lambda s: step.choose(ctx, scores, s), mflops, target,
                                                      s_cur, current, f_cur, o)
    step.apply(ctx, chosen)
    masks.report = {**report, "mflops": f_chosen, "sparsity": s_chosen, "achieved_sparsity": masks.sparsity(),
                    "bisection_iterations": iters, "collapsed": masks.collapsed(), "obs": step.method.report}
    return masks


def _bisect_flops(at: Callable[[float], dict], mflops: Callable[[dict], float], target: float, s_cur: float,
                  current: dict, f_cur: float, o: FlopsOptions) -> tuple[float, dict, float, int]:
    """(sparsity, masks, MFLOPs, iterations): the global sparsity in [current, ``max_sparsity``] whose masks come
    within ``flops_epsilon`` of ``target`` (at most 50 bisections; the closest one found otherwise)."""
    hi = max(o.max_sparsity, s_cur)
    m_hi = at(hi)
    f_hi = mflops(m_hi)
    if f_hi > target + o.flops_epsilon:
        warnings.warn(f"FLOPs target {target:g} MFLOPs is unreachable: at max_sparsity={hi:g} the model still has "
                      f"{f_hi:.3f} MFLOPs (non-prunable layers); stopping there", stacklevel=3)
        return hi, m_hi, f_hi, 0
    lo = s_cur
    best = min(((abs(f_cur - target), lo, current, f_cur), (abs(f_hi - target), hi, m_hi, f_hi)), key=lambda t: t[0])
    iters = 0
    while iters < 50 and best[0] >= o.flops_epsilon:
        iters += 1
        mid = 0.5 * (lo + hi)
        m_mid = at(mid)
        f_mid = mflops(m_mid)
        if abs(f_mid - target) < best[0]:
            best = (abs(f_mid - target), mid, m_mid, f_mid)
        if f_mid > target:
            lo = mid
        else:
            hi = mid
    return best[1], best[2], best[3], iters
