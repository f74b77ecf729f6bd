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
from typing import TYPE_CHECKING, Callable, Iterable, Literal

import torch
from torch import nn

from .data_checks import CheckedData, check_data  # noqa: F401  (check_data, CheckedData: importable here too)
from . import distributed
from .errors import PrunekitError, closest
from .masks import ExistingZerosWarning, Masks
from .params import ParamSpec, prunable_params
from .patterns import Pattern, check_layers, parse_pattern, select_nm
from .registry import MethodInfo, ScoreContext, default_loss, get_method
from .registry import methods as _methods
from .select import check_sparsity, keep_count, select
from .seeding import generator
from .typed import from_dict

if TYPE_CHECKING:
    from .flops_target import Budget


@dataclass(frozen=True)
class PruneOptions:
    """Options shared by every method.

    - ``scope``: ``global`` (one ranking over all prunable entries) or ``layer`` (the same rule in each tensor).
    - ``rounds``: R pruning rounds on the density schedule (None = the method's default); ``schedule``:
      ``exponential`` (d_r = d^(r/R)) or ``linear``. Weights are not trained between rounds.
    - ``seed``: seeds the mask generator (random scores, sample choice), independent of training.
    - ``min_keep_per_layer``: reserve the q best entries of every tensor (global scope), a layer-collapse guard.
    - ``nan_policy``: ``error`` or ``lowest`` for NaN scores.
    - ``exclude``, ``exclude_first``, ``exclude_output``, ``include_bias``, ``modules``, ``targets``, ``ignore``:
      which tensors are prunable (see :class:`prunekit.params.ParamSpec`; ``targets`` / ``ignore`` take module-name
      patterns, ``"re:<regex>"`` or an exact module or class name).
    - ``pattern``: None (unstructured) or ``"N:M"`` (``"2:4"``, ``"4:8"``): N kept in every group of M consecutive
      weights along each layer's input dimension (:mod:`prunekit.patterns`). The sparsity is then 1 − N/M (leave
      it out, or give exactly that); ``scope`` does not apply (the choice is within each group) and
      ``min_keep_per_layer`` is refused. Rounds and gradual schedules step through n:M, n from M down to N, so
      every step's mask is a valid pattern and the masks are nested. Methods that choose their masks with their
      own rule (structured, ``sipp``, ``obc``, the IMP codes) refuse it; ``sparsegpt`` and ``wanda`` apply it in
      their own solve.
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
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] | None = None
    pattern: str | int | None = None  # int only to explain an unquoted YAML 2:4 (read as the number 124)

    def validate(self, path: str, error) -> None:
        if self.rounds is not None and self.rounds < 1:
            raise error(f"rounds must be at least 1, got {self.rounds}")
        if self.min_keep_per_layer < 0:
            raise error(f"min_keep_per_layer must be >= 0, got {self.min_keep_per_layer}")
        if parse_pattern(self.pattern, error) is not None and self.min_keep_per_layer:
            raise error(f"min_keep_per_layer does not apply with pattern {self.pattern} (every group of M keeps N "
                        "weights, so no layer can collapse): remove it")

    @property
    def nm(self) -> Pattern | None:
        """The parsed ``pattern`` (None: unstructured)."""
        return parse_pattern(self.pattern)

    def param_spec(self) -> ParamSpec:
        return ParamSpec(exclude=self.exclude, exclude_first=self.exclude_first, exclude_output=self.exclude_output,
                         include_bias=self.include_bias, modules=self.modules, targets=self.targets,
                         ignore=self.ignore)


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


def pattern_sparsity(pattern, sparsity=None, density=None, compression=None) -> float:
    """The sparsity of a call with ``pattern`` (``"N:M"``): 1 − N/M when none of sparsity / density / compression
    is given; a given one must be a level of the pattern, 1 − n/M with N <= n <= M (the final N:M, or an
    intermediate n:M step of a schedule), else a PrunekitError saying which to ask for."""
    pat = parse_pattern(pattern)
    if sparsity is None and density is None and compression is None:
        return pat.sparsity
    s = resolve_sparsity(sparsity, density, compression)
    return pat.level_sparsity(pat.level(s))


def check_pattern_method(info: MethodInfo) -> None:
    """A PrunekitError when ``info``'s method cannot follow an N:M pattern: the IMP codes, structured methods and
    methods with their own selection that do not declare ``supports_pattern`` (a class attribute of the method
    class, set by the layer-wise methods that apply the pattern in their solve)."""
    use = "use a method that scores single weights (magnitude, snip, fts, woodfisher…, sparsegpt, wanda)"
    if info.kind == "levels":
        raise PrunekitError(f"method {info.name!r} is an IMP code: it prunes between training levels with its own "
                            f"rule, which does not follow N:M patterns; {use}")
    if info.structured:
        raise PrunekitError(f"method {info.name!r} is structured: it removes whole filters/channels, so an N:M "
                            f"pattern (N of every M single weights) does not apply; {use}")
    if info.select is not None and not getattr(info.factory, "supports_pattern", False):
        raise PrunekitError(f"method {info.name!r} ({info.family}) chooses its masks with its own rule, which does "
                            f"not follow N:M groups (pattern is not implemented for it); {use}")


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
    if common.pattern is not None and info.kind != "dense":  # the dense baseline prunes nothing: any pattern holds
        check_pattern_method(info)
    method_opts = info.make_options(**{k: v for k, v in options.items() if k in own})
    return common, method_opts


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
    if distributed.active():
        distributed.same_on_all(*[t.data if isinstance(t, torch.nn.Parameter) else t for t in tensors.values()])


def _check_scores(info: MethodInfo, masks: Masks, scores: dict) -> dict:
    missing = [n for n in masks.names() if n not in scores]
    if missing:
        raise RuntimeError(f"method {info.name!r} returned no scores for {missing[0]!r}")
    return {n: scores[n] for n in masks.names()}



# ------------------------------------------------------------------------------------------------------- checks
def check_model(model, who: str = "prune") -> None:
    """A clear error when ``model`` is not an ``nn.Module`` (e.g. a model name given as a string)."""
    if isinstance(model, nn.Module):
        return
    if isinstance(model, str):
        raise PrunekitError(f"pk.{who} got the string {model!r} instead of a model: build it first with "
                            f"model = prunekit.models.get_model({model!r}) and pass the module")
    raise PrunekitError(f"pk.{who} needs a torch.nn.Module as its model, got {type(model).__name__}")


def starting_masks(model: nn.Module, spec: ParamSpec, action: str = "prune", stacklevel: int = 3) -> Masks:
    """The masks a call without ``masks=`` starts from: every exact zero already in a prunable tensor counts as
    pruned (the masks are ``weight != 0``), so the returned masks never claim a kept weight that is 0. A tensor that
    is entirely zero (e.g. a zero-initialised bias under ``include_bias``) is an initialisation, not a mask, and is
    left dense. When zeros are found an :class:`ExistingZerosWarning` says how many."""
    params = prunable_params(model, spec)
    found: dict[str, torch.Tensor] = {}
    zeros = total = 0
    for p in params:
        t = p.tensor.detach()
        n = t.numel()
        total += n
        if n == 0:
            continue
        z = n - int(torch.count_nonzero(t))
        if 0 < z < n:
            found[p.name] = t != 0
            zeros += z
    masks = Masks(model, params, masks=found or None)
    if zeros:
        consequence = ("prune treats them as pruned, so they stay 0 and the result is at least that sparse"
                       if action == "prune" else f"{action} treats them as pruned")
        warnings.warn(
            f"the model already has {zeros:,} exact zeros among its {total:,} prunable weights (sparsity "
            f"{zeros / total:.4f}) and no masks= was given: {consequence}; pass masks= (e.g. the Masks an earlier "
            f"pk.prune returned) to choose the starting masks yourself",
            ExistingZerosWarning, stacklevel=stacklevel)
    return masks


def _check_reachable(masks: Masks, s: float, given: bool) -> None:
    """Global scope: masks are nested, so a sparsity below the current one cannot be reached (checked before any
    scoring; :func:`prunekit.select.select` would refuse it after)."""
    total, kept = masks.total(), masks.kept()
    k = keep_count(total, s)
    if k <= kept:
        return
    where = ("its masks" if given else
             "its exact zeros, which prune counts as pruned when no masks= is given")
    raise PrunekitError(
        f"sparsity {s:g} keeps {k:,} of {total:,} prunable weights but only {kept:,} are left (current sparsity "
        f"{1 - kept / total:.4f}, from {where}); pruned weights stay pruned, so ask for a sparsity of at least "
        f"{1 - kept / total:.4f}" + ("" if given else ", or pass masks= to start from other masks"))


def _budget(sparsity, density, compression, macs, speedup, latency, latency_batch, budget_tol) -> Budget | None:
    """The compute budget of a :func:`prune` call (None: a sparsity call); a sparsity (or density, compression)
    together with a budget is an error."""
    from .flops_target import Budget

    budget = Budget.of(macs, speedup, latency, latency_batch, budget_tol)
    if isinstance(sparsity, Budget):
        if budget is not None:
            raise PrunekitError("give the budget once: as sparsity=Budget(...) or as macs=/speedup=/latency=")
        budget, sparsity = sparsity, None
    if budget is not None:
        given = [k for k, v in (("sparsity", sparsity), ("density", density), ("compression", compression))
                 if v is not None]
        if given:
            raise PrunekitError(f"{given[0]}= and a {budget.cost} budget exclude each other: the budget chooses the "
                                f"sparsity (by bisection); remove {given[0]}= or the budget")
    return budget


def prune(
    model: nn.Module,
    method: str,
    sparsity: float | Budget | None = None,
    data: Iterable | None = None,
    scope: str | None = None,
    *,
    density: float | None = None,
    compression: float | None = None,
    macs: float | None = None,
    speedup: float | None = None,
    latency: float | None = None,
    latency_batch: int | None = None,
    budget_tol: float | None = None,
    masks: Masks | None = None,
    loss: Callable | None = None,
    **options,
) -> Masks:
    """Prune ``model`` in place with ``method`` to ``sparsity`` (or to a compute budget) and return its
    :class:`Masks`.

    A compute budget instead of a sparsity (one of, and not with ``sparsity`` / ``density`` / ``compression``):
    ``macs=0.5`` keeps half the dense MACs (:mod:`prunekit.flops`), ``speedup=2`` the same as a MACs speedup,
    ``latency=0.5`` half the dense latency predicted at batch ``latency_batch`` (default 1) by the per-layer
    latency table (structured methods only); ``budget_tol`` is the relative tolerance (default 0.01 for MACs,
    0.02 for latency). The method scores once and its own selection is bisected on its sparsity until the budget
    is met (:func:`prunekit.flops_target.prune_by_budget`); ``masks.report`` then also has ``macs_fraction`` (or
    ``ms_fraction``), ``speedup``, ``hit`` and ``budget``. A structured method's MACs are those of the shrunk model
    (``pk.shrink``); an unstructured method's are its kept weights times their output positions (a count, not a
    speedup on dense hardware). ``sparsity`` may also be a :class:`prunekit.flops_target.Budget` (the form the
    harness's schedules pass).

    ``scope``: ``global`` (default) or ``layer``; codes that fix their scope (``magni``, ``globalmagni``) use it.

    Scores the current masked model, selects nested masks with exact counts and applies them, ``rounds`` times on
    the density schedule. Pass ``masks`` to continue from earlier masks (they stay nested). ``options`` are the
    fields of :class:`PruneOptions` and the method's own options; an unknown one is an error that lists both.

    Without ``masks``, exact zeros already in the prunable tensors count as pruned: the starting masks are
    ``weight != 0`` (an :class:`~prunekit.masks.ExistingZerosWarning` says how many zeros were found; a tensor
    that is entirely zero is left dense). So the returned masks never call a weight kept that is 0 (unless the
    method's own weight update sets one to exactly 0), the result is at least as sparse as the model already was,
    and asking a global sparsity below the current one is an error raised before scoring (``scope="layer"`` keeps
    every layer's existing zeros, so such a layer ends sparser than asked). Pass ``masks=`` to choose the starting
    masks yourself.

    ``pattern="N:M"`` (a :class:`PruneOptions` field): N kept in every group of M along each layer's input
    dimension; the sparsity is then 1 − N/M and may be left out (:func:`pattern_sparsity`; ``rounds`` go through
    the patterns n:M in between, see :mod:`prunekit.patterns`).

    Data-dependent methods check ``data`` before any scoring (first batch only, one small forward): batches of
    (inputs, targets) tensors, finite inputs, a model whose forward takes one input that fits them, class-index
    labels in range for the default loss, and a re-iterable when the method reads the data more than once
    (see :func:`check_data`).
    """
    check_model(model, "prune")
    budget = _budget(sparsity, density, compression, macs, speedup, latency, latency_batch, budget_tol)
    if budget is not None:
        from .flops_target import prune_by_budget

        return prune_by_budget(model, method, budget, data, masks=masks, loss=loss, scope=scope, **options)
    if options.get("pattern") is not None:
        s = pattern_sparsity(options["pattern"], sparsity, density, compression)
    else:
        s = resolve_sparsity(sparsity, density, compression)
    step = PruningStep(model, method, data, masks, loss, {"scope": scope, **options})
    t0 = time.perf_counter()
    nm = step.common.nm
    if step.prunes and s > 0:
        if step.common.scope == "global" and step.method.select is None and nm is None:
            _check_reachable(step.masks, s, step.given)
        step.check_data(step.rounds)
        start = step.masks.sparsity() if step.common.scope == "global" or nm is not None else 0.0
        for rnd, s_r in enumerate(round_sparsities(s, step.rounds, step.common.schedule, start=min(start, s)), start=1):
            if nm is not None:  # the round's pattern n:M, n from M down to N (nested, each a valid pattern)
                s_r = nm.level_sparsity(nm.nearest_level(s_r))
            ctx, scores = step.score(rnd)
            step.apply(ctx, step.choose(ctx, scores, s_r))
    masks, info = step.masks, step.info
    collapsed = masks.collapsed()
    if collapsed:
        warnings.warn(f"layer collapse: {len(collapsed)} prunable tensor(s) have no weight left: {', '.join(collapsed)}",
                      stacklevel=2)
    masks.report = {
        "method": info.name, "sparsity": s, "scope": step.common.scope, "rounds": step.rounds if step.prunes else 0,
        "seconds": time.perf_counter() - t0, "collapsed": collapsed, "achieved_sparsity": masks.sparsity(),
        "pattern": None if nm is None else str(nm),
    }
    return masks


class PruningStep:
    """One method pruning one model: the pieces every driver (:func:`prune`, :func:`prunekit.flops_target.
    prune_to_flops`, schedules, cascades) goes through, so each gets the same checks.

    Construction checks the method (training methods run only as experiments), splits the options, and takes the
    starting masks (``masks``, or the model's existing zeros). :meth:`check_data` validates the data once;
    :meth:`score` scores a round (checked, agreed across DDP ranks); :meth:`choose` selects nested masks (the
    method's own selection, or exact counts); :meth:`apply` runs the method's weight update, then applies the masks.
    One method object (:meth:`prunekit.registry.MethodInfo.new`) carries state from a round's score to its
    selection and update."""

    def __init__(self, model: nn.Module, method: str, data, masks: Masks | None, loss: Callable | None,
                 options: dict, action: str = "prune"):
        self.model, self.info = model, get_method(method)
        if action == "prune" and self.info.kind == "levels":
            raise PrunekitError(f"method {self.info.name!r} is iterative magnitude pruning: it trains between levels, "
                                "so it runs as an experiment (`prunekit run` with a config, see configs/seed001/) or "
                                "with prunekit.families.imp.lottery.run_imp; for one-shot magnitude pruning use "
                                "method 'magnitude'")
        self.common, self.options = split_options(self.info, options)
        self.given = masks is not None
        self.masks = masks if masks is not None else starting_masks(model, self.common.param_spec(), action,
                                                                    stacklevel=4)
        if self.common.nm is not None and action == "prune" and self.info.kind != "dense":
            check_layers(self.masks.params, self.common.nm)  # every layer cut into groups of M, before any scoring
        self.data, self.loss = data, loss
        self.rounds = self.common.rounds or self.info.default_rounds
        self.prunes = self.info.kind != "dense"
        self.method = self.info.new()

    def check_data(self, rounds: int = 1) -> None:
        self.data = check_data(self.model, self.data, self.info, rounds, self.loss)

    def score(self, rnd: int = 1) -> tuple[ScoreContext, dict]:
        ctx = _context(self.model, self.info, self.masks, self.data, self.loss, self.options, self.common, rnd)
        scores = _check_scores(self.info, self.masks, self.method.score(ctx))
        agree(scores)  # DDP: rank 0's scores everywhere, so every rank selects the identical mask
        self.masks.scores = scores  # the last round's scores (TensorBoard histograms); not saved with the masks
        return ctx, scores

    def choose(self, ctx: ScoreContext, scores: dict, sparsity: float) -> dict:
        c = self.common
        if c.nm is not None:
            n = c.nm.level(sparsity)  # a sparsity that is no level of the pattern is an error (e.g. a FLOPs search)
            if self.method.select is not None:
                return self.method.select(ctx, scores, sparsity)
            return select_nm(scores, self.masks.as_dict(), self.masks.params, n, c.nm, nan_policy=c.nan_policy)
        if self.method.select is not None:
            return self.method.select(ctx, scores, sparsity)
        return select(scores, self.masks.as_dict(), sparsity, c.scope, min_keep_per_layer=c.min_keep_per_layer,
                      nan_policy=c.nan_policy)

    def apply(self, ctx: ScoreContext, new: dict) -> None:
        if self.method.update is not None:
            with torch.no_grad():
                self.method.update(ctx, self.masks.as_dict(), new)
                agree({p.name: p.tensor for p in self.masks.params})  # DDP: the updated weights of rank 0
        self.masks.set(new)


def score(model: nn.Module, method: str, data: Iterable | None = None, *, masks: Masks | None = None,
          loss: Callable | None = None, **options) -> dict[str, torch.Tensor]:
    """Scores of ``method`` for every prunable tensor of ``model`` (``{param name: tensor}``, higher = keep).

    Pure: the model is not changed. ``options`` as for :func:`prune` (``rounds`` and ``scope`` do not apply).
    Without ``masks``, exact zeros in the prunable tensors count as pruned, as in :func:`prune`.
    """
    check_model(model, "score")
    step = PruningStep(model, method, data, masks, loss, options, action="score")
    step.check_data(1)
    return step.score(1)[1]


def sparsity(model: nn.Module, **param_options) -> float:
    """Fraction of exact zeros among the prunable weights of ``model`` (default: Conv/Linear weights)."""
    check_model(model, "sparsity")
    params = prunable_params(model, **param_options)
    total = sum(p.tensor.numel() for p in params)
    zeros = sum(int((p.tensor == 0).sum()) for p in params)
    return zeros / total
