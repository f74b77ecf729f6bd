"""Prune to a compute target: the sparsity of one pruning step is bisected until the model's MACs
(:mod:`prunekit.flops`) meet the target, built on the one pruning step (:class:`prunekit.prune.PruningStep`), so
it gets every check :func:`prunekit.prune` makes. The scores are computed once; only the method's own selection
runs per bisection step, and the method's own allocation decides which weights or channels go.

- :func:`prune_to_flops` (seed 003, second_order.md §6): one OBS step to an absolute MFLOPs target within
  ``flops_epsilon`` (the FLOPs options of ``woodfisherblock_flops``).
- :func:`prune_to_macs`: any method (the channel methods ``filter_l1``, ``filter_l2``, ``filter_random``,
  ``bn_scale``, ``pfp`` above all) to a fraction of the dense MACs (``macs=0.5``) or a MACs speedup
  (``speedup=2``) within a relative tolerance. A structured method's MACs are those of the shrunk model
  (``pk.shrink``): every Conv/Linear weight counted with the channels its groups keep, so a zero input slice inside
  a kept channel (pfp drops slices per reader) still counts, as it does after shrinking.
- :func:`prune_to_latency`: a structured method to a fraction of the dense predicted latency.
- :class:`Budget` and :func:`prune_by_budget`: the form ``pk.prune(model, method, macs=0.5 | speedup=2 |
  latency=0.5, data=...)`` and the experiment harness (``prune: {method: pfp, macs: 0.5}``) go through.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

from torch import nn

import torch

from .errors import PrunekitError
from .families.obs.options import FlopsOptions
from .flops import layer_positions, macs
from .masks import Masks
from .prune import PruningStep
from .registry import get_method
from .structured.channel_scores import cached_channel_groups
from .structured.channel_masks import channel_masks_from_masks
from .structured.select import masks_from_channels


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
    return bisect_sparsity(at, mflops, target, (s_cur, current, f_cur), (hi, m_hi, f_hi), o.flops_epsilon)


def bisect_sparsity(at: Callable[[float], dict], cost: Callable[[dict], float], target: float,
                    lo: tuple[float, dict, float], hi: tuple[float, dict, float], tol: float, iters: int = 50,
                    reachable: list[float] | None = None) -> tuple[float, dict, float, int]:
    """(sparsity, masks, cost, iterations): bisection on the sparsity between ``lo`` and ``hi`` (each ``(sparsity,
    masks, cost)``; the cost does not increase with the sparsity) for masks whose ``cost`` is within ``tol``
    (absolute) of ``target``; at most ``iters`` calls of ``at(sparsity) -> masks``. Returns the first point within
    ``tol`` (or the closest one seen; on a tie the one with the smaller cost). ``at`` may raise
    :class:`PrunekitError` for a sparsity its method cannot reach (a channel method: above what removing whole
    channels allows, or below what it must remove): such a point below every sparsity in ``reachable`` (known to
    work) moves the bracket up, any other one moves it down."""
    s_lo, s_hi = lo[0], hi[0]
    reachable = list(reachable or [])
    cands = [lo, hi]

    def key(c):
        return abs(c[2] - target), c[2] > target

    best = min(cands, key=key)
    n = 0
    while n < iters and key(best)[0] >= tol and s_hi - s_lo > 1e-7:
        n += 1
        mid = 0.5 * (s_lo + s_hi)
        try:
            m = at(mid)
        except PrunekitError:
            if reachable and mid < min(reachable):
                s_lo = mid
            else:
                s_hi = mid
            continue
        reachable.append(mid)
        c = cost(m)
        if key((mid, m, c)) < key(best):
            best = (mid, m, c)
        if c > target:
            s_lo = mid
        else:
            s_hi = mid
    return best[0], best[1], best[2], n


def _fraction(kept: float | None, speedup: float | None, what: str = "macs") -> float:
    unit = "MACs" if what == "macs" else "latency"
    if (kept is None) == (speedup is None):
        raise PrunekitError(f"prune_to_{what} needs exactly one target: {what}= (the fraction of the dense {unit} to "
                            f"keep, e.g. 0.5) or speedup= (dense {unit} / pruned {unit}, e.g. 2)")
    if kept is not None:
        f = float(kept)
        if not 0.0 < f <= 1.0:
            raise PrunekitError(f"{what}= is the fraction of the dense {unit} kept, in (0, 1]; got {kept!r} (for "
                                "a speedup use speedup=)")
        return f
    if not float(speedup) >= 1.0:
        raise PrunekitError(f"speedup= must be >= 1 (dense {unit} / pruned {unit}), got {speedup!r}")
    return 1.0 / float(speedup)


def prune_to_macs(model: nn.Module, method: str, data=None, *, macs: float | None = None,
                  speedup: float | None = None, tol: float = 0.01, masks: Masks | None = None, loss=None,
                  input_shape=None, example=None, max_sparsity: float = 0.999, **options) -> Masks:
    """Prune ``model`` in place with ``method`` so that its MACs per example are ``macs`` times the dense MACs (or
    ``1 / speedup`` times), within ``tol`` relative to that target, and return the :class:`Masks`.

    The method scores once; its own selection (its allocation, channel rounding, size search) runs for each
    sparsity of a bisection in [current sparsity, ``max_sparsity``] (at most 50 steps), and its weight update runs
    once, for the chosen masks. The MACs are counted by :mod:`prunekit.flops` on ``input_shape`` (default
    ``model.input_shape``) or ``example`` (a transformer: a dict batch of one example); the dense MACs count
    every Conv/Linear weight. For a structured method (``pk.methods()`` ``structured``) the MACs are those of the
    shrunk model (see the module docstring), so ``pk.shrink`` gives a model with exactly the reported MACs.

    ``masks.report``: ``target_macs``, ``macs``, ``dense_macs``, ``macs_fraction``, ``speedup``, ``sparsity``
    (the one bisected), ``achieved_sparsity``, ``bisection_iterations``, ``hit``. When no sparsity gets within
    ``tol`` (channel granularity, or layers that cannot shrink), the closest is used with a warning. A model
    already at or below the target is left unchanged. ``options``: the method's options and the common prune
    options (``seed``, ``exclude``, ``round_channels``, ...); sampled methods (``filter_random``, pfp ``rand``)
    see the same random draws at every bisection step.
    """
    frac = _fraction(macs, speedup)
    info = get_method(method)
    step = PruningStep(model, method, data, masks, loss, options)
    layers = layer_positions(model, input_shape, example)
    names = {p.name: p.module_name for p in step.masks.params if p.attr == "weight"}
    if info.structured:  # every counted layer as shrinking leaves it, prunable or not (an excluded reader too)
        names.update({f"{mod}.weight": mod for mod in layers})
        shrunk = _shrunk(model, data, names)
    else:
        shrunk = _identity

    def cost(m: dict) -> float:
        return _macs_of(layers, {names[n]: int(v.sum()) for n, v in shrunk(m).items() if n in names})

    dense = _macs_of(layers, {})
    return _prune_to_cost(step, frac * dense, dense, cost, tol, max_sparsity, "macs", "MACs")


def prune_to_latency(model: nn.Module, method: str, data=None, *, latency: float | None = None,
                     speedup: float | None = None, batch: int = 1, table=None, tol: float = 0.02,
                     masks: Masks | None = None, loss=None, input_shape=None, max_sparsity: float = 0.999,
                     **options) -> Masks:
    """Prune ``model`` in place with a structured ``method`` until its PREDICTED latency is ``latency`` times the
    dense one (or ``1 / speedup``), within ``tol``: :func:`prune_to_macs` with the cost of a selection the summed
    milliseconds, from the per-layer latency table (:class:`prunekit.structured.latency_table.LatencyTable`,
    measured once per device and layer shape, cached on disk; ``table=`` to pass one), of every Conv2d
    (``groups == 1``) and Linear layer at the widths the shrunk model would have, at batch ``batch``. Other layers
    (depthwise convs, norms, activations) are not predicted. ``masks.report``: ``target_ms``, ``ms``,
    ``dense_ms``, ``ms_fraction``, ``speedup`` (predicted), ``sparsity``, ``bisection_iterations``, ``hit``."""
    from .structured.latency_table import LatencyTable, predicted_ms, timed_layers

    frac = _fraction(latency, speedup, what="latency")
    info = get_method(method)
    if not info.structured:
        raise PrunekitError(f"prune_to_latency predicts the latency of a shrunk model, so it needs a structured "
                            f"method (filter_l1, filter_l2, filter_random, bn_scale, pfp), got {info.name!r}")
    step = PruningStep(model, method, data, masks, loss, options)
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise PrunekitError("prune_to_latency needs the input shape: pass input_shape=(C, H, W) or set "
                            "model.input_shape")
    table = table if table is not None else LatencyTable()
    layers = timed_layers(model, shape)
    names = {p.name: p.module_name for p in step.masks.params if p.attr == "weight"}
    names.update({f"{mod}.weight": mod for mod in layers})
    shrunk = _shrunk(model, data, names)

    def cost(m: dict) -> float:
        widths = {}
        for n, v in shrunk(m).items():
            mod = names.get(n)
            if mod in layers:
                w = v.reshape(v.shape[0], v.shape[1], -1)
                widths[mod] = (int(w.any(0).any(1).sum()), int(w.any(2).any(1).sum()))
        return predicted_ms(table, layers, widths, batch)

    dense = predicted_ms(table, layers, {}, batch)
    return _prune_to_cost(step, frac * dense, dense, cost, tol, max_sparsity, "ms", "predicted latency")


def _identity(m: dict) -> dict:
    return m


def _shrunk(model: nn.Module, data, weights) -> Callable[[dict], dict]:
    """masks -> the masks of the shrunk structure for every tensor of ``weights`` (parameter names: the masked
    tensors and any other layer that shrinking narrows, such as an excluded output layer reading pruned channels):
    every kept channel of each group whole (``pk.shrink``)."""
    groups = cached_channel_groups(model, data)
    params = dict(model.named_parameters())
    shape = {n: params[n].shape for n in weights if n in params}

    def shrunk(m: dict) -> dict:
        cm = channel_masks_from_masks(model, groups, m)
        ones = {n: torch.ones(s, dtype=torch.bool) for n, s in shape.items()}
        return masks_from_channels(model, groups, cm, ones)
    return shrunk


def _prune_to_cost(step: PruningStep, target: float, dense: float, cost: Callable[[dict], float], tol: float,
                   max_sparsity: float, key: str, what: str) -> Masks:
    """The bisection of :func:`prune_to_macs` / :func:`prune_to_latency` on ``cost`` (``key`` names it in the
    report, ``what`` in messages)."""
    if not 0.0 < tol < 1.0:
        raise PrunekitError(f"tol is relative to the {what} target and must be in (0, 1), got {tol!r}")
    masks, name = step.masks, step.info.name
    current = masks.as_dict()
    c_cur, s_cur = cost(current), masks.sparsity()
    report = {"method": name, "scope": step.common.scope, f"target_{key}": target, f"dense_{key}": dense,
              f"{key}_before": c_cur}
    if c_cur <= target * (1.0 + tol):
        masks.report = {**report, key: c_cur, f"{key}_fraction": c_cur / dense, "speedup": dense / c_cur,
                        "sparsity": s_cur, "achieved_sparsity": s_cur, "bisection_iterations": 0, "hit": True,
                        "skipped": True}
        return masks
    step.check_data(1)
    ctx, scores = step.score(1)
    state = ctx.generator.get_state()

    def at(s: float) -> dict:
        ctx.generator.set_state(state)  # the same draws at every step, and for the final selection
        return step.choose(ctx, scores, s)

    hi = _highest(at, cost, max(max_sparsity, s_cur))
    reachable = [hi[0]] if hi[1] is not None else _reachable(at, s_cur, hi[0])
    s_best, _, c_best, iters = bisect_sparsity(at, cost, target, (s_cur, current, c_cur), hi, tol * target,
                                               reachable=reachable)
    chosen = at(s_best)  # again, so the method's state (its channels, its rescaling) is that of the chosen masks
    step.apply(ctx, chosen)
    hit = abs(c_best - target) <= tol * target
    if not hit:
        warnings.warn(f"prune to {what} ({name}): no sparsity keeps {target / dense:.4g} of the dense {what} within "
                      f"tol={tol:g}; the closest keeps {c_best / dense:.4f} (sparsity {s_best:.4f})", stacklevel=3)
    masks.report = {**report, key: c_best, f"{key}_fraction": c_best / dense, "speedup": dense / max(c_best, 1e-12),
                    "sparsity": s_best, "achieved_sparsity": masks.sparsity(), "bisection_iterations": iters,
                    "hit": hit}
    return masks


def _macs_of(layers, nnz) -> float:
    return float(macs(layers, nnz))


def _reachable(at: Callable[[float], dict], s_cur: float, s_max: float, points: int = 12) -> list[float]:
    """Sparsities of an even grid over (``s_cur``, ``s_max``) that the method reaches (it may refuse both ends)."""
    out = []
    for i in range(1, points):
        s = s_cur + (s_max - s_cur) * i / points
        try:
            at(s)
            out.append(s)
        except PrunekitError:
            pass
    return out


def _highest(at: Callable[[float], dict], cost: Callable[[dict], float], s_max: float
             ) -> tuple[float, dict | None, float]:
    """(sparsity, masks, cost) at ``s_max``; when the method refuses it (a channel method cannot remove more than
    whole channels allow), ``(s_max, None, -inf)``: the bisection then treats refused sparsities as below the
    target and closes in on the largest one the method reaches."""
    try:
        m = at(s_max)
        return s_max, m, cost(m)
    except PrunekitError:
        return s_max, None, -math.inf


# ------------------------------------------------------------------------------------------------ budget knob
BUDGET_COSTS = ("macs", "latency")


@dataclass(frozen=True)
class Budget:
    """What one pruning step must reach instead of a sparsity: ``fraction`` of the dense ``cost`` kept.

    - ``cost``: ``macs`` (:mod:`prunekit.flops`; a structured method counts the shrunk model, an unstructured one
      its kept weights) or ``latency`` (the latency predicted by the per-layer latency table at batch ``batch``;
      structured methods only).
    - ``fraction``: in (0, 1]; ``1 / fraction`` is the speedup asked for.
    - ``tol``: relative to the target (default 0.01 for MACs, 0.02 for latency); ``max_sparsity``: the top of the
      bisection.

    :meth:`of` builds one from the keywords of ``pk.prune`` (``macs=``, ``speedup=``, ``latency=``,
    ``latency_batch=``, ``budget_tol=``).
    """

    cost: str
    fraction: float
    batch: int = 1
    tol: float | None = None
    max_sparsity: float = 0.999

    def __post_init__(self):
        if self.cost not in BUDGET_COSTS:
            raise PrunekitError(f"unknown budget cost {self.cost!r}: use one of {', '.join(BUDGET_COSTS)}")
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise PrunekitError(f"a {self.cost} budget keeps a fraction of the dense {self.unit} in (0, 1], got "
                                f"{f!r} (for a speedup s give speedup=s, i.e. a fraction 1/s)")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise PrunekitError(f"latency_batch must be a whole number >= 1, got {self.batch!r}")
        if self.cost == "macs" and self.batch != 1:
            raise PrunekitError("latency_batch applies to a latency budget (latency=...); MACs are counted per "
                                "example: remove it")
        if self.tol is not None and not 0.0 < float(self.tol) < 1.0:
            raise PrunekitError(f"budget_tol is relative to the target and must be in (0, 1), got {self.tol!r}")
        if not 0.0 < self.max_sparsity < 1.0:
            raise PrunekitError(f"max_sparsity must be in (0, 1), got {self.max_sparsity!r}")

    @property
    def unit(self) -> str:
        return "MACs" if self.cost == "macs" else "predicted latency"

    @property
    def speedup(self) -> float:
        """The speedup asked for: dense cost / target cost."""
        return 1.0 / self.fraction

    @property
    def tolerance(self) -> float:
        return float(self.tol) if self.tol is not None else (0.01 if self.cost == "macs" else 0.02)

    @classmethod
    def of(cls, macs: float | None = None, speedup: float | None = None, latency: float | None = None,
           latency_batch: int | None = None, budget_tol: float | None = None) -> "Budget | None":
        """The budget of ``pk.prune``'s keywords: ``macs`` (fraction of the dense MACs), ``speedup`` (dense MACs /
        pruned MACs) or ``latency`` (fraction of the dense predicted latency, at batch ``latency_batch``, default
        1); None when none of the three is given (then ``latency_batch`` and ``budget_tol`` must be absent)."""
        given = [k for k, v in (("macs", macs), ("speedup", speedup), ("latency", latency)) if v is not None]
        if not given:
            extra = [k for k, v in (("latency_batch", latency_batch), ("budget_tol", budget_tol)) if v is not None]
            if extra:
                raise PrunekitError(f"{extra[0]} belongs to a budget: give macs=, speedup= or latency= with it, or "
                                    "remove it")
            return None
        if len(given) > 1:
            raise PrunekitError(f"give one budget, not {' and '.join(given)}: macs= (fraction of the dense MACs), "
                                "speedup= (dense MACs / pruned MACs) or latency= (fraction of the dense predicted "
                                "latency; a latency speedup s is latency=1/s)")
        if latency is not None:
            return cls("latency", _number(latency, "latency"), batch=1 if latency_batch is None else latency_batch,
                       tol=budget_tol)
        if latency_batch is not None:
            raise PrunekitError("latency_batch applies to a latency budget (latency=...), not to macs=/speedup=: "
                                "remove it")
        frac = _fraction(None if macs is None else _number(macs, "macs"),
                         None if speedup is None else _number(speedup, "speedup"))
        return cls("macs", frac, tol=budget_tol)

    def to_dict(self) -> dict:
        return {"cost": self.cost, "fraction": self.fraction, "batch": self.batch, "tol": self.tol,
                "max_sparsity": self.max_sparsity}


def _number(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PrunekitError(f"{name}= must be a number, got {v!r}")
    return float(v)


def prune_by_budget(model: nn.Module, method: str, budget: Budget, data=None, *, masks: Masks | None = None,
                    loss=None, input_shape=None, example=None, **options) -> Masks:
    """``pk.prune`` with a :class:`Budget` instead of a sparsity: :func:`prune_to_macs` or :func:`prune_to_latency`
    in one step (``rounds`` and ``pattern`` do not apply), with the report of ``pk.prune`` (``seconds``,
    ``scope``, ``rounds``, ``collapsed``, ``pattern``) and ``budget`` added. Without ``input_shape`` or
    ``model.input_shape`` (a transformer) the MACs are counted on the first example of the first batch of
    ``data``."""
    info = get_method(method)
    if info.kind == "dense":
        raise PrunekitError(f"method {info.name!r} prunes nothing, so a {budget.cost} budget cannot be met: use a "
                            "pruning method")
    if options.get("pattern") is not None:
        raise PrunekitError(f"pattern {options['pattern']} fixes the sparsity (1 - N/M), so it does not combine "
                            f"with a {budget.cost} budget: give one of them")
    if options.get("rounds") not in (None, 1):
        raise PrunekitError(f"a {budget.cost} budget is met in one pruning step (the method's selection is "
                            f"bisected on its sparsity), got rounds={options['rounds']}: remove rounds")
    options = {k: v for k, v in options.items() if k != "rounds"}
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None and example is None:
        example = _first_example(data)
    t0 = time.perf_counter()
    if budget.cost == "macs":
        masks = prune_to_macs(model, method, data, macs=budget.fraction, tol=budget.tolerance, masks=masks,
                              loss=loss, input_shape=shape, example=example, max_sparsity=budget.max_sparsity,
                              **options)
    else:
        masks = prune_to_latency(model, method, data, latency=budget.fraction, batch=budget.batch,
                                 tol=budget.tolerance, masks=masks, loss=loss, input_shape=shape,
                                 max_sparsity=budget.max_sparsity, **options)
    collapsed = masks.collapsed()
    if collapsed:
        warnings.warn(f"layer collapse: {len(collapsed)} prunable tensor(s) have no weight left: "
                      f"{', '.join(collapsed)}", stacklevel=3)
    masks.report = {**masks.report, "seconds": time.perf_counter() - t0, "rounds": 1, "collapsed": collapsed,
                    "pattern": None, "budget": budget.to_dict()}
    return masks


def _first_example(data):
    """The first example of the first batch of ``data`` (a dict of tensors, a :class:`DictInputs` or a tensor with
    a batch dimension of 1), to count a transformer's MACs on."""
    if data is None:
        raise PrunekitError("a MACs budget counts the MACs of one example: the model has no input_shape, so pass "
                            "data= (its first example is used) or set model.input_shape")
    if iter(data) is data:
        raise PrunekitError("a MACs budget counts the MACs of the first example of data=, so data must be "
                            "re-iterable (a list of batches or a DataLoader), not a one-pass iterator")
    try:
        batch = next(iter(data))
    except (TypeError, StopIteration):
        raise PrunekitError("a MACs budget counts the MACs of the first example of data=, but data gave no batch; "
                            "pass an iterable of batches") from None
    x = batch
    if isinstance(batch, (tuple, list)):
        x = batch[0]
    if isinstance(x, dict):
        return {k: v[:1] for k, v in x.items() if k not in ("labels", "label") and torch.is_tensor(v)}
    return x[:1]
