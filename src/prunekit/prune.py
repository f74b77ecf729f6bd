"""The public pruning API: ``prune``, ``score``, ``sparsity``.

``prune`` = for each round: score the current masked model, select nested masks with exact counts, apply them.
Options common to every method live in :class:`PruneOptions`; each method's own options live in its typed options
class (``pk.get_method(name).options``). Both are passed as keyword arguments and validated.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PrunekitError
from .masks import Masks
from .params import ParamSpec, prunable_params
from .registry import MethodInfo, ScoreContext, get_method
from .registry import methods as _methods
from .select import check_sparsity, select
from .seeding import generator
from .typed import from_dict


@dataclass(frozen=True)
class PruneOptions:
    """Options shared by every method.

    - ``scope``: ``global`` (one ranking over all prunable entries) or ``layer`` (the same rule in each tensor).
    - ``rounds``: R pruning rounds on the density schedule (None = the method's default); ``schedule``:
      ``exponential`` (d_r = d^(r/R)) or ``linear``. Weights are not trained between rounds.
    - ``seed``: seeds the mask generator (random scores, sample choice), independent of training.
    - ``min_keep_per_layer``: reserve the q best entries of every tensor (global scope), a layer-collapse guard.
    - ``nan_policy``: ``error`` or ``lowest`` for NaN scores.
    - ``exclude``, ``exclude_first``, ``exclude_output``, ``include_bias``, ``modules``: which tensors are
      prunable (see :class:`prunekit.params.ParamSpec`).
    """

    scope: Literal["global", "layer"] = "global"
    rounds: int | None = None
    schedule: Literal["exponential", "linear"] = "exponential"
    seed: int = 0
    min_keep_per_layer: int = 0
    nan_policy: Literal["error", "lowest"] = "error"
    exclude: tuple[str, ...] = ()
    exclude_first: bool = False
    exclude_output: bool = False
    include_bias: bool = False
    modules: tuple[str, ...] | None = None

    def validate(self, path: str, error) -> None:
        if self.rounds is not None and self.rounds < 1:
            raise error(f"rounds must be at least 1, got {self.rounds}")
        if self.min_keep_per_layer < 0:
            raise error(f"min_keep_per_layer must be >= 0, got {self.min_keep_per_layer}")

    def param_spec(self) -> ParamSpec:
        return ParamSpec(self.exclude, self.exclude_first, self.exclude_output, self.include_bias, self.modules)


_COMMON = {f.name for f in dataclasses.fields(PruneOptions)}


def resolve_sparsity(sparsity=None, density=None, compression=None, default: float = 0.9) -> float:
    """The sparsity from exactly one of sparsity, density (1 - s) or compression c (density 10^-c)."""
    given = [k for k, v in (("sparsity", sparsity), ("density", density), ("compression", compression)) if v is not None]
    if len(given) > 1:
        raise PrunekitError(f"give only one of sparsity, density, compression (got {', '.join(given)})")
    if density is not None:
        d = float(density)
        if not 0.0 < d <= 1.0:
            raise PrunekitError(f"density {density!r} is outside (0, 1]: it is the fraction of prunable weights kept")
        return check_sparsity(1.0 - d)
    if compression is not None:
        c = float(compression)
        if c < 0:
            raise PrunekitError(f"compression {compression!r} must be >= 0 (density = 10^-compression)")
        return check_sparsity(1.0 - 10.0 ** (-c))
    return check_sparsity(default if sparsity is None else sparsity)


def round_sparsities(sparsity: float, rounds: int, schedule: str = "exponential", start: float = 0.0) -> list[float]:
    """Per-round sparsities, r = 1..R, from the current sparsity ``start`` (0 for a dense model) to ``sparsity``.

    From a dense model: density d^(r/R) (exponential) or 1 - (1 - d)·r/R (linear). From density d0 the same
    schedule runs between d0 and d: d0·(d/d0)^(r/R), or d0 - (d0 - d)·r/R.
    """
    d, d0 = 1.0 - sparsity, 1.0 - start
    if schedule == "exponential":
        dens = [d0 * (d / d0) ** (r / rounds) for r in range(1, rounds + 1)]
    elif schedule == "linear":
        dens = [d0 - (d0 - d) * r / rounds for r in range(1, rounds + 1)]
    else:
        raise PrunekitError(f"unknown schedule {schedule!r}: use 'exponential' or 'linear'")
    dens[-1] = d  # exact target on the last round
    return [1.0 - x for x in dens]


def split_options(info: MethodInfo, options: dict) -> tuple[PruneOptions, object]:
    """Split keyword options into the common :class:`PruneOptions` and the method's own typed options."""
    own = set(info.option_names())
    bad = [k for k in options if k not in _COMMON and k not in own]
    if bad:
        valid = sorted(own) + sorted(_COMMON)
        from .errors import closest

        near = closest(bad[0], valid)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise PrunekitError(f"unknown option {bad[0]!r} for method {info.name!r}{hint}; valid options: {', '.join(valid)}")
    common_kw = {k: v for k, v in options.items() if k in _COMMON}
    if info.scope is not None:
        given = common_kw.get("scope")
        if given is not None and given != info.scope:
            other = [m.name for m in _methods() if m.scope == given and m.family == info.family]
            hint = f": use method {other[0]!r} for that" if other else ""
            raise PrunekitError(f"method {info.name!r} always selects with scope={info.scope!r}, got "
                                f"scope={given!r}{hint}")
        common_kw["scope"] = info.scope
    elif common_kw.get("scope") is None:
        common_kw.pop("scope", None)
    common = from_dict(PruneOptions, common_kw, error=PrunekitError)
    method_opts = info.make_options(**{k: v for k, v in options.items() if k in own})
    return common, method_opts


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


def _context(model, info, masks: Masks, data, loss, method_opts, common: PruneOptions, rnd: int) -> ScoreContext:
    if info.needs_data in ("inputs", "labels") and data is None:
        raise PrunekitError(
            f"method {info.name!r} needs data: pass data= an iterable of (inputs, targets) batches (a DataLoader works)"
        )
    return ScoreContext(
        model=model,
        params=masks.params,
        masks=masks.as_dict(),
        data=data,
        loss=loss or default_loss,
        options=method_opts,
        generator=generator(common.seed, "mask", info.name, str(rnd)),
        round=rnd,
        prune_options=common,
    )


def agree(tensors: dict) -> None:
    """Under DDP, rank 0's values of ``tensors`` on every rank (no-op in one process): the scores of every rank are
    the same statistic, reduced in a possibly different floating-point order; broadcasting rank 0's copy makes the
    masks selected from them identical on every rank (see :mod:`prunekit.distributed`)."""
    from . import distributed

    if distributed.active():
        distributed.same_on_all(*[t.data if isinstance(t, torch.nn.Parameter) else t for t in tensors.values()])


def _check_scores(info: MethodInfo, masks: Masks, scores: dict) -> dict:
    missing = [n for n in masks.names() if n not in scores]
    if missing:
        raise RuntimeError(f"method {info.name!r} returned no scores for {missing[0]!r}")
    return {n: scores[n] for n in masks.names()}


def prune(
    model: nn.Module,
    method: str,
    sparsity: float | None = None,
    data: Iterable | None = None,
    scope: str | None = None,
    *,
    density: float | None = None,
    compression: float | None = None,
    masks: Masks | None = None,
    loss: Callable | None = None,
    **options,
) -> Masks:
    """Prune ``model`` in place with ``method`` to ``sparsity`` and return its :class:`Masks`.

    ``scope``: ``global`` (default) or ``layer``; codes that fix their scope (``magni``, ``globalmagni``) use it.

    Scores the current masked model, selects nested masks with exact counts and applies them, ``rounds`` times on
    the density schedule. Pass ``masks`` to continue from earlier masks (they stay nested). ``options`` are the
    fields of :class:`PruneOptions` and the method's own options; an unknown one is an error that lists both.
    """
    info = get_method(method)
    from .criteria.iterative import check_not_training

    check_not_training(info)
    common, method_opts = split_options(info, {"scope": scope, **options})
    s = resolve_sparsity(sparsity, density, compression)
    if masks is None:
        masks = Masks(model, prunable_params(model, common.param_spec()))
    rounds = common.rounds or info.default_rounds
    t0 = time.perf_counter()
    if info.score is not None and info.name != "none" and s > 0:
        start = masks.sparsity() if common.scope == "global" else 0.0
        for rnd, s_r in enumerate(round_sparsities(s, rounds, common.schedule, start=min(start, s)), start=1):
            ctx = _context(model, info, masks, data, loss, method_opts, common, rnd)
            scores = _check_scores(info, masks, info.score(ctx))
            agree(scores)  # DDP: rank 0's scores everywhere, so every rank selects the identical mask
            masks.scores = scores  # the last round's scores (TensorBoard histograms); not saved with the masks
            if info.select is not None:
                new = info.select(ctx, scores, s_r)
            else:
                new = select(scores, masks.as_dict(), s_r, common.scope,
                             min_keep_per_layer=common.min_keep_per_layer, nan_policy=common.nan_policy)
            if info.update is not None:
                with torch.no_grad():
                    info.update(ctx, masks.as_dict(), new)
                    agree({p.name: p.tensor for p in masks.params})  # DDP: the updated weights of rank 0
            masks.set(new)
    collapsed = masks.collapsed()
    if collapsed:
        warnings.warn(f"layer collapse: {len(collapsed)} prunable tensor(s) have no weight left: {', '.join(collapsed)}",
                      stacklevel=2)
    masks.report = {
        "method": info.name, "sparsity": s, "scope": common.scope, "rounds": rounds if info.name != "none" else 0,
        "seconds": time.perf_counter() - t0, "collapsed": collapsed, "achieved_sparsity": masks.sparsity(),
    }
    return masks


def score(model: nn.Module, method: str, data: Iterable | None = None, *, masks: Masks | None = None,
          loss: Callable | None = None, **options) -> dict[str, torch.Tensor]:
    """Scores of ``method`` for every prunable tensor of ``model`` (``{param name: tensor}``, higher = keep).

    Pure: the model is not changed. ``options`` as for :func:`prune` (``rounds`` and ``scope`` do not apply).
    """
    info = get_method(method)
    common, method_opts = split_options(info, options)
    if masks is None:
        masks = Masks(model, prunable_params(model, common.param_spec()))
    ctx = _context(model, info, masks, data, loss, method_opts, common, 1)
    return _check_scores(info, masks, info.score(ctx))


def sparsity(model: nn.Module, **param_options) -> float:
    """Fraction of exact zeros among the prunable weights of ``model`` (default: Conv/Linear weights)."""
    params = prunable_params(model, **param_options)
    total = sum(p.tensor.numel() for p in params)
    zeros = sum(int((p.tensor == 0).sum()) for p in params)
    return zeros / total
