"""The method registry: every pruning method under its seed code, with metadata and typed options.

A method is a *criterion* (a pure score function ``score(ctx) -> {param name: Tensor}``, higher = keep) plus
metadata. Register one with :func:`register`::

    @dataclass(frozen=True)
    class MyOptions:
        temperature: float = 1.0

    @register("mine", family="pruning at init", needs_data="labels", summary="...", options=MyOptions)
    def mine(ctx: ScoreContext) -> dict[str, torch.Tensor]:
        ...
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import torch
from torch import nn

from .errors import PrunekitError, unknown
from .params import PrunableParam
from .typed import from_dict

NeedsData = Literal["none", "inputs", "labels", "training"]
Kind = Literal["dense", "one-shot", "levels"]


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


def default_loss(outputs, targets: torch.Tensor) -> torch.Tensor:
    """The loss criteria use unless given one: cross-entropy, the mean over the batch. For a model output that is
    not a tensor (a transformers ``ModelOutput``, from a dict batch with ``labels``): its own ``.loss`` when it has
    one, else cross-entropy of its ``.logits`` against the targets."""
    if not isinstance(outputs, torch.Tensor):
        own = getattr(outputs, "loss", None)
        if isinstance(own, torch.Tensor):
            return own
        logits = getattr(outputs, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise PrunekitError(f"the model returned a {type(outputs).__name__} with neither .loss nor .logits: "
                                "pass loss=")
        outputs = logits
    return torch.nn.functional.cross_entropy(outputs, targets)


@dataclass
class ScoreContext:
    """Everything a criterion may read. Criteria must not modify the model, its buffers or its gradients.

    - ``params``: the prunable tensors, in order; ``masks``: their current boolean masks (the model's weights are
      already masked, so ``p.tensor`` is the effective weight).
    - ``data``: an iterable of ``(inputs, targets)`` batches (or dict batches with ``labels``, see
      :mod:`prunekit.batches`), or None for data-free methods.
    - ``loss``: ``loss(outputs, targets) -> scalar`` (mean over the batch), cross-entropy by default.
    - ``options``: the method's typed options; ``generator``: a seeded generator reserved for the mask
      (independent of the training RNG); ``round``: 1-based pruning round; ``state``: scratch space that the
      score fills for the method's update (same round); ``prune_options``: the shared
      :class:`prunekit.prune.PruneOptions` of the call (scope, min_keep_per_layer, ...), for methods that select.
    """

    model: nn.Module
    params: list[PrunableParam]
    masks: Mapping[str, torch.Tensor]
    data: Iterable | None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    options: Any
    generator: torch.Generator
    round: int = 1
    state: dict = field(default_factory=dict)  # what a score leaves for the method's update (e.g. Fisher factors)
    prune_options: Any = None


@dataclass(frozen=True)
class MethodInfo:
    """Metadata of a registered method. ``score`` is None for ``none`` (no mask)."""

    name: str
    family: str
    needs_data: NeedsData
    structured: bool
    summary: str
    options: type = NoOptions
    score: Callable[[ScoreContext], dict] | None = field(default=None, repr=False)
    default_rounds: int = 1
    sources: tuple[str, ...] = ()  # the source systems (seed READMEs 000-004) the method comes from
    aliases: tuple[str, ...] = ()
    default_samples: Any = "all"
    rebatches: bool = True
    update: Callable[[ScoreContext, dict, dict], None] | None = field(default=None, repr=False)
    scope: str | None = None  # a method whose code fixes the scope (magni: layer, globalmagni: global)
    select: Callable[[ScoreContext, dict, float], dict] | None = field(default=None, repr=False)

    kind: Kind | None = None  # how an experiment runs it; None: "levels" for training methods, else "one-shot"
    factory: Callable[[], "PruningMethod"] | None = field(default=None, repr=False)  # a fresh method object
    dict_batches: bool = False  # reads dict batches (``model(**batch)``, Hugging Face style)

    def new(self) -> "PruningMethod":
        """A fresh method object for one prune call: ``score(ctx)``, and ``select`` / ``update`` (None when the
        method has none). It holds whatever the method carries from its score to its selection and update."""
        if self.factory is not None:
            return self.factory()
        return FunctionMethod(self.score, self.select, self.update)

    def __post_init__(self):
        if self.kind is None:  # dense (``none``: no mask) is declared; levels: the IMP codes (train, prune, rewind)
            object.__setattr__(self, "kind", "levels" if self.needs_data == "training" else "one-shot")
        elif self.kind not in ("dense", "one-shot", "levels"):
            raise ValueError(f"method {self.name!r}: kind must be 'dense', 'one-shot' or 'levels', got {self.kind!r}")

    @property
    def seeds(self) -> tuple[str, ...]:
        """Deprecated name of :attr:`sources` ("seed" now means a random seed only)."""
        import warnings

        warnings.warn("MethodInfo.seeds is deprecated: use MethodInfo.sources", DeprecationWarning, stacklevel=2)
        return self.sources

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]

    def make_options(self, **kw):
        """The method's typed options from keyword arguments; an unknown option lists the valid ones."""
        return from_dict(self.options, kw, error=PrunekitError) if kw else self.options()


class FunctionMethod:
    """The method object of a method registered as functions (a score, optional select and update); they share
    what they pass on through ``ctx.state``."""

    def __init__(self, score, select=None, update=None):
        self.score, self.select, self.update = score, select, update


class PruningMethod:
    """Base class of a method registered as a class: ``@register(...)`` on a subclass with ``score(ctx)`` and,
    where the method needs them, ``select(ctx, scores, sparsity)`` and ``update(ctx, masks_before, masks_after)``.
    :func:`prunekit.prune` makes one instance per call, so state passes from a round's score to its selection and
    update on ``self`` (never through ``ctx.state``). ``select = None`` / ``update = None`` mean the generic
    selection / no weight update."""

    select = None
    update = None

    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


_REGISTRY: dict[str, MethodInfo] = {}
_ALIASES: dict[str, str] = {}


def register(
    name: str,
    *,
    family: str,
    needs_data: NeedsData,
    summary: str,
    options: type = NoOptions,
    structured: bool = False,
    default_rounds: int = 1,
    sources: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    default_samples: Any = "all",
    rebatches: bool = True,
    update: Callable[[ScoreContext, dict, dict], None] | None = None,
    scope: str | None = None,
    select: Callable[[ScoreContext, dict, float], dict] | None = None,
    seeds: tuple[str, ...] | None = None,
    kind: Kind | None = None,
    dict_batches: bool = False,
):
    """Decorator registering method ``name``: a score function (with ``select`` / ``update`` functions given here),
    or a :class:`PruningMethod` subclass that defines them (one instance per :func:`prunekit.prune` call).

    ``sources``: the source systems the method comes from (``seeds=`` is its deprecated name). ``kind``: how an
    experiment runs the method, ``dense`` (no mask: ``none``), ``levels`` (train-prune-rewind levels; the default
    for ``needs_data="training"``) or ``one-shot`` (masks at the steps of a schedule; the default otherwise).

    ``default_samples``: the scoring-data budget used by experiments unless a config sets ``samples``
    (:mod:`prunekit.data.scoring`); ``rebatches``: the criterion regroups its data into its own mini-batches, so the
    experiment may feed it in any batch size (False when the composition of the given batches matters, e.g. PX's
    batch statistics); ``update(ctx, masks_before, masks_after)``: moves the surviving weights after selection
    (the OBS family), reading what the score left in ``ctx.state``; it runs before the new masks are applied.
    ``scope``: the selection scope the code itself means (``magni`` is layer-wise, ``globalmagni`` global); asking
    such a method for the other scope is an error. ``select(ctx, scores, sparsity) -> {name: bool mask}``: the
    method's own selection instead of :func:`prunekit.select.select` (SiPP's per-neuron budgets, PFP's channels,
    filter pruning); it must return masks nested in ``ctx.masks`` and meet the target size (``sparsity`` of the
    prunable weights, i.e. ``round((1 - s) * n)`` kept, within the method's documented tolerance).
    ``dict_batches``: the method reads dict batches (``model(**batch)``, Hugging Face style, through
    :func:`prunekit.batches.labelled_pair` / :func:`prunekit.batches.call`); a built-in method without it refuses
    them before scoring (:func:`prunekit.data_checks.check_data`). Methods registered outside prunekit receive
    whatever batches they are given.
    """

    if seeds is not None:
        import warnings

        warnings.warn("register(seeds=...) is deprecated: use sources=", DeprecationWarning, stacklevel=2)
        sources = tuple(sources) + tuple(s for s in seeds if s not in sources)

    def deco(fn):
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"method {name!r} registered twice")
        score_, select_, update_, factory = fn, select, update, None
        if isinstance(fn, type):  # a method class: one instance per prune call (a shared one for MethodInfo's fields)
            if select is not None or update is not None:
                raise ValueError(f"method {name!r}: a method class defines select/update itself")
            factory, shared = fn, fn()
            score_, select_, update_ = shared.score, getattr(shared, "select", None), getattr(shared, "update", None)
        info = MethodInfo(name, family, needs_data, structured, summary, options, score_, default_rounds,
                          tuple(sources), aliases, default_samples, rebatches, update_, scope, select_, kind, factory,
                          dict_batches)
        _REGISTRY[name] = info
        for a in aliases:
            _ALIASES[a] = name
        return fn

    return deco


def _load_builtin() -> None:
    from . import families  # noqa: F401  (registers the built-in methods)


def get_method(name: str) -> MethodInfo:
    """The :class:`MethodInfo` registered under ``name`` or one of its aliases."""
    _load_builtin()
    if not isinstance(name, str):
        raise PrunekitError(f"method must be a method code string, got {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise unknown("method", name, list(_REGISTRY) + list(_ALIASES))
    return _REGISTRY[key]


def methods() -> list[MethodInfo]:
    """All registered methods, in registration order."""
    _load_builtin()
    return list(_REGISTRY.values())


def snapshot() -> tuple[dict[str, MethodInfo], dict[str, str]]:
    """Copies of the registry's tables (methods by name, aliases), built-in methods loaded first."""
    _load_builtin()
    return dict(_REGISTRY), dict(_ALIASES)


@contextmanager
def scoped() -> Iterator[None]:
    """Methods registered inside the block are unregistered on exit (and methods replaced or removed inside it come
    back), so a test or a notebook cell can register a throw-away method without changing the registry for the
    code that runs after it. The built-in methods are loaded before the snapshot, so they are never dropped."""
    methods_, aliases = snapshot()
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(methods_)
        _ALIASES.clear()
        _ALIASES.update(aliases)
