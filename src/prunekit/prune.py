"""The public pruning API: ``prune``, ``score``, ``sparsity``.

``prune`` = for each round: score the current masked model, select nested masks with exact counts, apply them.
Options common to every method live in :class:`PruneOptions`; each method's own options live in its typed options
class (``pk.get_method(name).options``). Both are passed as keyword arguments and validated.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import itertools
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .batches import labelled_pair
from .errors import PrunekitError
from .masks import ExistingZerosWarning, Masks
from .params import ParamSpec, prunable_params
from .registry import MethodInfo, ScoreContext, default_loss, get_method
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
        nz = t != 0
        z = n - int(nz.sum())
        if 0 < z < n:
            found[p.name] = nz
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
    from .select import keep_count

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


def _batch_inputs(batch) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    return None


class CheckedData:
    """The data after :func:`check_data`. The first pass (the first ``iter()``, i.e. when the method starts reading
    its data) reads the first batch, validates it with ``validate(batch)``, then replays it and continues the same
    iterator: no extra pass, no extra draw of a shuffling loader, nothing read when a method refuses earlier (e.g.
    a memory planner). Later passes iterate the original data again; for a one-shot iterator (a generator,
    ``iter(loader)``) a second pass is an error."""

    def __init__(self, data, one_shot: bool, who: str, validate: Callable[[object], None]):
        self.data, self.one_shot, self.who, self._validate = data, one_shot, who, validate
        self._started = False

    def __iter__(self):
        if self._started:
            if self.one_shot:
                raise PrunekitError(_one_shot_message(self.who, "reads the data more than once"))
            return iter(self.data)
        self._started = True
        try:
            it = iter(self.data)
        except TypeError:
            raise PrunekitError(f"data must be an iterable of (inputs, targets) batches (a DataLoader works), got "
                                f"{type(self.data).__name__}") from None
        try:
            first = next(it)
        except StopIteration:
            if self.one_shot:
                raise PrunekitError("data is an exhausted iterator (a generator or iter(loader) that was already "
                                    "read to its end): pass a re-iterable instead, e.g. the DataLoader itself or a "
                                    "list of (inputs, targets) batches") from None
            raise PrunekitError(f"data yielded no batch, so there is no example to score: {self.who} needs at "
                                "least one (inputs, targets) batch") from None
        self._validate(first)
        return itertools.chain([first], it)


def _one_shot_message(who: str, why: str) -> str:
    return (f"data is a one-shot iterator (a generator or iter(loader)) but {who} {why}: pass a re-iterable "
            "instead, e.g. the DataLoader itself or a list of (inputs, targets) batches")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _first_layer_check(model: nn.Module, x: torch.Tensor):
    """Forward pre-hooks that check the input of the first Conv/Linear the forward reaches against the data."""
    names = {m: n for n, m in model.named_modules()}
    seen = []

    def pre(mod, args):
        if seen:
            return
        seen.append(mod)
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if inp is None or any(isinstance(p, nn.parameter.UninitializedParameter) for p in mod.parameters()):
            return
        name = names.get(mod, type(mod).__name__)
        if isinstance(mod, nn.modules.conv._ConvNd):
            d = len(mod.kernel_size)
            if inp.dim() in (d + 1, d + 2) and inp.shape[-d - 1] != mod.in_channels:
                c = inp.shape[-d - 1]
                raise PrunekitError(
                    f"the model expects {mod.in_channels} input channels (its first layer {name!r} is {mod}) but "
                    f"the data has {c} channels (inputs of shape {_shape(x)}): feed {mod.in_channels}-channel inputs "
                    f"or build the model for {c} channels (e.g. prunekit.models.get_model(name, input_shape=("
                    f"{c}, ...)))")
        elif isinstance(mod, nn.Linear) and inp.dim() >= 1 and inp.shape[-1] != mod.in_features:
            raise PrunekitError(
                f"the model's first layer {name!r} ({mod}) expects {mod.in_features} input features but receives "
                f"{inp.shape[-1]} from inputs of shape {_shape(x)}: the data does not fit this model (another "
                "dataset or input size?)")

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules()
             if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    return hooks


def _check_arity(model: nn.Module) -> None:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    ps = list(sig.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in ps):
        return
    required = [p.name for p in ps if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) > 1:
        raise PrunekitError(
            f"{type(model).__name__}.forward takes {len(required)} inputs ({', '.join(required)}) but data batches "
            "give one (inputs, targets pairs): wrap the model in a module whose forward(x) takes a single input "
            "(packing the other inputs into x or holding them as attributes)")


def _check_labels(out: torch.Tensor, x: torch.Tensor, y) -> None:
    """Labels that the default cross-entropy accepts for outputs ``out``: class indices (int64 or uint8) of shape
    [n, *positions] in 0..C-1 (or -100, its ignore_index), or class probabilities of the outputs' shape."""
    if not isinstance(y, torch.Tensor):
        raise PrunekitError(f"labels (targets) must be a tensor, got {type(y).__name__}")
    n = x.shape[0]
    if out.dim() < 2:
        return  # not a [n, classes] output: the loss decides
    classes = out.shape[1]
    want = (n,) + tuple(out.shape[2:])
    fix_loss = " (or pass loss= for other targets)"
    if y.is_floating_point():
        if tuple(y.shape) == (n,) + tuple(out.shape[1:]):
            if not bool(torch.isfinite(y).all()):
                raise PrunekitError("the first data batch has NaN or infinite label probabilities: the targets must "
                                    "be finite")
            return  # class probabilities
        raise PrunekitError(
            f"labels are floating point ({y.dtype}, shape {_shape(y)}) but the default cross-entropy needs integer "
            f"class indices of shape {want}: pass y.long(){fix_loss}")
    if y.dtype == torch.bool or y.is_complex():
        raise PrunekitError(f"labels have dtype {y.dtype}: the default cross-entropy needs int64 class indices "
                            f"of shape {want}: pass y.long(){fix_loss}")
    if tuple(y.shape) != want:
        hint = ""
        if y.dim() == len(want) + 1 and y.shape[1] == 1:
            hint = "; use y.squeeze(1)"
        elif tuple(y.shape) == (n,) + tuple(out.shape[1:]):
            hint = "; they look one-hot: use y.argmax(1)"
        raise PrunekitError(
            f"labels have shape {_shape(y)} but the model's outputs {(n,) + tuple(out.shape[1:])} need class "
            f"indices of shape "
            f"{want}{hint}{fix_loss}")
    if y.dtype not in (torch.int64, torch.uint8):
        raise PrunekitError(f"labels have dtype {y.dtype} but the default cross-entropy needs int64 class indices: "
                            "pass y.long()")
    if y.numel():
        valid = y[y != -100] if y.dtype == torch.int64 else y
        if valid.numel():
            lo, hi = int(valid.min()), int(valid.max())
            if lo < 0 or hi >= classes:
                raise PrunekitError(
                    f"labels range from {lo} to {hi} but the model has {classes} outputs: labels must be class "
                    f"indices in 0..{classes - 1} (a model built for more classes, e.g. "
                    f"prunekit.models.get_model(name, num_classes={hi + 1}), or labels for this one)")


def check_data(model: nn.Module, data, info: MethodInfo, rounds: int = 1, loss: Callable | None = None):
    """Validate the scoring data of a data-dependent method, and return what to score on (a :class:`CheckedData`).

    At once, without reading the data: ``data`` must be an iterable of batches (not a tensor, not one
    ``(inputs, targets)`` pair), a one-shot iterator (a generator, ``iter(loader)``) is refused when the method
    scores in several rounds, and the model's forward must take a single input. When the method first reads the
    data, before any batch is scored: the first batch only, and one forward of its first few samples (eval mode,
    no gradient; modes, buffers and the RNG restored): batches of tensors, finite inputs, a first layer whose
    channels / features fit the inputs, and for the default cross-entropy class-index labels in range. An
    exhausted iterator and a second pass over a one-shot iterator are errors too.
    """
    who = f"method {info.name!r}"
    if data is None or info.needs_data not in ("inputs", "labels") or isinstance(data, CheckedData):
        return data
    if isinstance(data, torch.Tensor):
        raise PrunekitError("data is a single tensor: pass an iterable of (inputs, targets) batches, e.g. "
                            "[(x, y)] or a DataLoader")
    if (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
            and data[0].dim() > 1 and data[1].dim() > 0 and data[0].shape[0] == data[1].shape[0]):
        raise PrunekitError("data looks like one (inputs, targets) batch, not an iterable of batches: pass [(x, y)] "
                            "(a list with one batch) or a DataLoader")
    if not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        raise PrunekitError(f"data must be an iterable of (inputs, targets) batches (a DataLoader works), got "
                            f"{type(data).__name__}")
    one_shot = isinstance(data, collections.abc.Iterator)
    if one_shot and rounds > 1:
        raise PrunekitError(_one_shot_message(who, f"scores in {rounds} rounds, each of which reads the data"))
    _check_arity(model)
    labels = info.needs_data == "labels"
    return CheckedData(data, one_shot, who, lambda batch: _check_batch(model, batch, labels, loss))


def _check_batch(model: nn.Module, first, labels: bool, loss: Callable | None) -> None:
    """The checks of :func:`check_data` on the first batch."""
    x = y = None
    if labels:
        x, y = labelled_pair(first)
    else:
        x = _batch_inputs(first)
        if x is None:
            raise PrunekitError(f"each data batch must be an (inputs, targets) pair or an inputs tensor; got "
                                f"{type(first).__name__}")
        if x.dim() == 0:
            raise PrunekitError(f"inputs must have a batch dimension, got a tensor of shape {_shape(x)}")
    if x.is_floating_point() or x.is_complex():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            n_nan = int(torch.isnan(x).sum())
            raise PrunekitError(
                f"the data batches contain non-finite inputs: the first batch (shape {_shape(x)}) has {n_nan} NaN "
                f"and {int(bad.sum()) - n_nan} infinite values; clean the data (e.g. check the normalization: a zero "
                "std gives NaN) before scoring")
    if x.shape[0] > 0:
        _check_forward(model, x, y if labels and _is_default_loss(loss) else None)


def _is_default_loss(loss) -> bool:
    return loss is None or loss is default_loss or loss is F.cross_entropy


def _check_forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, samples: int = 4) -> None:
    """One forward of the first ``samples`` inputs in eval mode without gradients; the model is left unchanged."""
    from .modes import model_device, scoring_mode

    xs = x[:samples].to(model_device(model))
    fdtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), None)
    if fdtype is not None and xs.is_floating_point() and xs.dtype != fdtype:
        xs = xs.to(fdtype)
    hooks = _first_layer_check(model, x)
    try:
        with scoring_mode(model, "eval"), torch.no_grad():
            out = model(xs)
    except PrunekitError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise
    except TypeError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "positional argument" in msg or "required" in msg:
            raise PrunekitError(f"{type(model).__name__}.forward cannot be called with one input, as data batches "
                                f"give it ({msg}): wrap the model in a module whose forward(x) takes a single "
                                "input") from e
        raise PrunekitError(f"the model's forward fails on the first data batch (inputs of shape {_shape(x)}, "
                            f"{x.dtype}): {msg}") from e
    except Exception as e:  # noqa: BLE001 - reported as a user error naming the data, with the cause chained
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PrunekitError(f"the model's forward fails on the first data batch (inputs of shape {_shape(x)}, "
                            f"{x.dtype}): {msg}") from e
    finally:
        for h in hooks:
            h.remove()
    if y is not None and isinstance(out, torch.Tensor):
        _check_labels(out, x, y)


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

    Without ``masks``, exact zeros already in the prunable tensors count as pruned: the starting masks are
    ``weight != 0`` (an :class:`~prunekit.masks.ExistingZerosWarning` says how many zeros were found; a tensor
    that is entirely zero is left dense). So the returned masks never call a weight kept that is 0 (unless the
    method's own weight update sets one to exactly 0), the result is at least as sparse as the model already was,
    and asking a global sparsity below the current one is an error raised before scoring (``scope="layer"`` keeps
    every layer's existing zeros, so such a layer ends sparser than asked). Pass ``masks=`` to choose the starting
    masks yourself.

    Data-dependent methods check ``data`` before any scoring (first batch only, one small forward): batches of
    (inputs, targets) tensors, finite inputs, a model whose forward takes one input that fits them, class-index
    labels in range for the default loss, and a re-iterable when the method reads the data more than once
    (see :func:`check_data`).
    """
    check_model(model, "prune")
    s = resolve_sparsity(sparsity, density, compression)
    step = PruningStep(model, method, data, masks, loss, {"scope": scope, **options})
    t0 = time.perf_counter()
    if step.prunes and s > 0:
        if step.common.scope == "global" and step.method.select is None:
            _check_reachable(step.masks, s, step.given)
        step.check_data(step.rounds)
        start = step.masks.sparsity() if step.common.scope == "global" else 0.0
        for rnd, s_r in enumerate(round_sparsities(s, step.rounds, step.common.schedule, start=min(start, s)), start=1):
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
        from .families.imp.codes import check_not_training

        self.model, self.info = model, get_method(method)
        if action == "prune":
            check_not_training(self.info)
        self.common, self.options = split_options(self.info, options)
        self.given = masks is not None
        self.masks = masks if masks is not None else starting_masks(model, self.common.param_spec(), action,
                                                                    stacklevel=4)
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
        if self.method.select is not None:
            return self.method.select(ctx, scores, sparsity)
        c = self.common
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
