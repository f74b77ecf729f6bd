"""The typed resolved run: one run of an experiment with every default filled in and every name canonical.

:func:`prunekit.experiments.config.resolve_run` builds a :class:`ResolvedRun` from a config (the prune section is
resolved here, :func:`resolve_prune`: the method's options are split from the shared ones once, and checked). The
code that runs it reads typed fields (``resolved.prune.options.scope``, ``resolved.train.epochs``); its plain form,
:meth:`ResolvedRun.to_dict`, is what identifies the run (:func:`run_id`), what ``config.json`` and the results
store hold, and what :func:`prunekit.experiments.config.resolve` returns.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from ..families.imp.codes import DEFAULT_SCOPE, check_imp_options
from ..data.scoring import check_samples
from ..errors import ConfigError, PrunekitError, closest
from ..flops_target import Budget
from ..prune import PruneOptions, pattern_sparsity, resolve_sparsity, split_options
from ..registry import MethodInfo, get_method, methods
from ..schedules import Cascade, Gradual, OneShot
from ..train.config import TrainConfig
from ..typed import from_dict, to_dict

if TYPE_CHECKING:
    from .config import DataSection, ExperimentConfig

#: Keys of the prune section that set a compute budget instead of a sparsity (:class:`prunekit.flops_target.Budget`).
BUDGET_KEYS = ("macs", "speedup", "latency", "latency_batch", "budget_tol")

#: Keys of the prune section that are not options of prunekit.prune.
PRUNE_KEYS = ("method", "sparsity", "density", "compression", "warmup", "samples", "score_transform", "gradual",
              "cascade", "reconstruction") + BUDGET_KEYS

#: Resolved fields that do not change a run's result and so are left out of its identity.
NOT_IDENTITY = ("name", "train.progress", "train.device", "train.checkpoint_every", "train.eval_batch_size",
                "train.tensorboard", "model.pretrained.config", "model.pretrained.file", "model.pretrained.folder")

#: Fields added after runs were first stored: left out of the identity while unset, so older runs keep their ids.
ABSENT_WHEN_NONE = ("prune.gradual", "data.resize", "prune.cascade", "train.threads", "prune.options.targets",
                    "prune.options.ignore", "data.channels", "data.test_size", "data.max_length", "train.freeze",
                    "prune.options.pattern", "prune.method_options.pattern", "prune.method_options.round_channels",
                    "prune.method_options.per_weight_scores", "prune.reconstruction", "prune.budget")


@dataclass(frozen=True)
class PretrainedFile:
    """A model file written by ``prunekit.save``, identified by its content."""

    file: str
    sha256: str

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256}


@dataclass(frozen=True)
class PretrainedRun:
    """The run a run starts from: its id, which of its weights, its plain config and (not stored) its resolved form,
    so that running it first does not resolve it again."""

    run_id: str
    weights: str
    config: dict
    resolved: ResolvedRun = field(repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "weights": self.weights, "config": copy.deepcopy(self.config)}


@dataclass(frozen=True)
class PretrainedHF:
    """A Hugging Face encoder in a local folder (``folder``, not part of the identity), identified by the sha256 of
    its weights (of its ``config.json`` for ``init="random"``) and of its tokenizer."""

    name: str
    folder: str
    sha256: str
    tokenizer_sha256: str
    init: str = "pretrained"

    def to_dict(self) -> dict:
        return {"source": "hf", "name": self.name, "folder": self.folder, "sha256": self.sha256,
                "tokenizer_sha256": self.tokenizer_sha256, "init": self.init}


@dataclass(frozen=True)
class PretrainedZoo:
    """The published weights of a zoo model, identified by their pinned sha256 (``init="random"``: the same
    architecture freshly initialised, the from-scratch reference)."""

    name: str
    sha256: str
    init: str = "pretrained"

    def to_dict(self) -> dict:
        return {"source": "zoo", "name": self.name, "sha256": self.sha256, "init": self.init}


Pretrained = PretrainedFile | PretrainedRun | PretrainedHF | PretrainedZoo


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    pretrained: Pretrained | None = None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name}
        if self.pretrained is not None:
            out["pretrained"] = self.pretrained.to_dict()
        return out


def _origin(model: ResolvedModel):
    """Where a model's weights come from, following the runs it starts from back to the first one."""
    pre = model.pretrained
    while isinstance(pre, PretrainedRun):
        pre = pre.resolved.model.pretrained
    return pre


def hf_source(model: ResolvedModel) -> PretrainedHF | None:
    """The Hugging Face encoder a model comes from, directly or through the runs it starts from."""
    pre = _origin(model)
    return pre if isinstance(pre, PretrainedHF) else None


def zoo_source(model: ResolvedModel) -> PretrainedZoo | None:
    """The zoo model's published weights a model comes from, directly or through the runs it starts from."""
    pre = _origin(model)
    return pre if isinstance(pre, PretrainedZoo) else None


@dataclass(frozen=True)
class ResolvedCascade:
    """``prune.cascade`` with its keep ratios written out (so equal cascades hash equal)."""

    ratios: tuple[float, ...]
    retrain_iterations: int
    retrain_epochs: int | None

    def schedule(self) -> Cascade:
        return Cascade(ratios=self.ratios, retrain_iterations=self.retrain_iterations,
                       retrain_epochs=self.retrain_epochs)

    def to_dict(self) -> dict:
        return {"ratios": list(self.ratios), "retrain_iterations": self.retrain_iterations,
                "retrain_epochs": self.retrain_epochs}


@dataclass(frozen=True)
class ResolvedPrune:
    """The prune section of one run. ``sparsity`` is None for a levels method (IMP: it follows from the levels) and
    for a run with a compute ``budget`` (``prune.macs`` / ``speedup`` / ``latency``: the sparsity is bisected when
    it prunes, and recorded in its prune event); ``gradual`` holds the target sparsity; ``options`` and
    ``method_options`` are split and typed."""

    info: MethodInfo = field(repr=False, compare=False)
    sparsity: float | None
    options: PruneOptions
    method_options: Any
    warmup: int = 0
    samples: Any = None
    score_transform: str | None = None
    gradual: Gradual | None = None
    cascade: ResolvedCascade | None = None
    reconstruction: int | None = None  # held-out validation samples the reconstruction errors are measured on
    budget: Budget | None = None  # a compute budget instead of a sparsity (one-shot)

    @property
    def method(self) -> str:
        return self.info.name

    @property
    def kind(self) -> str:
        """The method's kind: ``dense``, ``one-shot`` or ``levels`` (:class:`prunekit.registry.MethodInfo`)."""
        return self.info.kind

    @property
    def protocol(self) -> str:
        """How the run goes: ``schedule`` (dense, or masks at the steps of a schedule under one training),
        ``levels`` (IMP: train, prune, rewind) or ``cascade`` (prune-retrain levels)."""
        if self.kind == "levels":
            return "levels"
        return "cascade" if self.cascade is not None else "schedule"

    @property
    def uses_data(self) -> bool:
        """Whether the method scores with data (the scoring set of ``samples``)."""
        return scores_with_data(self.info)

    def schedule(self) -> Gradual | OneShot:
        """When the masks are set: the gradual schedule, or once after ``warmup`` epochs."""
        if self.budget is not None:  # pk.prune takes the Budget in place of the sparsity
            return OneShot(self.budget, at_epoch=self.warmup)  # type: ignore[arg-type]
        return self.gradual if self.gradual is not None else OneShot(self.sparsity, at_epoch=self.warmup)

    def prune_kwargs(self) -> dict:
        """The options as keyword arguments of :func:`prunekit.prune` (plain values, shared ones first)."""
        return {**to_dict(self.options), **to_dict(self.method_options)}

    def to_dict(self) -> dict:
        gradual = None
        if self.gradual is not None:
            gradual = {k: v for k, v in to_dict(self.gradual).items() if k != "target_sparsity"}
        out = {"method": self.method, "sparsity": self.sparsity, "warmup": self.warmup, "samples": self.samples,
               "score_transform": self.score_transform, "gradual": gradual, "options": to_dict(self.options),
               "method_options": to_dict(self.method_options)}
        if self.kind != "levels":  # the levels methods never had the field (stored configs stay as they were)
            out["cascade"] = self.cascade.to_dict() if self.cascade is not None else None
        if self.reconstruction is not None:
            out["reconstruction"] = self.reconstruction
        if self.budget is not None:
            out["budget"] = self.budget.to_dict()
        return out


@dataclass(frozen=True)
class ResolvedRun:
    """One run, resolved. :meth:`to_dict` is its plain form (identity, ``config.json``, the store)."""

    name: str
    model: ResolvedModel
    data: DataSection
    train: TrainConfig
    prune: ResolvedPrune
    seed: int

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model.to_dict(), "data": to_dict(self.data),
                "train": to_dict(self.train), "prune": self.prune.to_dict(), "seed": self.seed}

    @cached_property
    def id(self) -> str:
        """The run id (:func:`run_id`)."""
        return run_id(self)


def run_id(resolved: ResolvedRun | dict) -> str:
    """Identity of a run: a hash of its resolved config, without the fields in :data:`NOT_IDENTITY` (the
    experiment's name, progress display, device choice, checkpoint frequency, evaluation batch size)."""
    ident = resolved.to_dict() if isinstance(resolved, ResolvedRun) else copy.deepcopy(resolved)
    for dotted in NOT_IDENTITY + ABSENT_WHEN_NONE:
        *parents, leaf = dotted.split(".")
        node = ident
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if dotted in NOT_IDENTITY or node.get(leaf, 0) is None:
            node.pop(leaf, None)
    model = ident.get("model")
    pre = model.get("pretrained") if isinstance(model, dict) else None
    if isinstance(pre, dict) and pre.get("source") == "hf":  # a folder's name is a label: its hashes identify it
        model.pop("name", None)
        pre.pop("name", None)
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_prune(cfg: ExperimentConfig) -> ResolvedPrune:
    """The resolved prune section of the one-run config ``cfg``; every mistake is a :class:`ConfigError`."""
    p = dict(cfg.prune)
    if "method" not in p:
        raise ConfigError("missing required field 'prune.method' (e.g. magnitude; `prunekit methods` lists them)")
    try:
        info = get_method(p["method"])
    except PrunekitError as e:
        raise ConfigError(f"field 'prune.method': {e}") from None
    if info.kind == "levels":
        return _resolve_levels(info, p, cfg)
    warmup = p.get("warmup", 0)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ConfigError(f"field 'prune.warmup': expected a whole number of epochs >= 0, got {warmup!r}")
    if warmup > cfg.train.epochs:
        raise ConfigError(f"field 'prune.warmup': {warmup} epochs of warm-up exceed train.epochs={cfg.train.epochs}")
    if info.kind == "dense":
        return _resolve_dense(info, p, cfg)
    if any(p.get(k) is not None for k in BUDGET_KEYS):
        return _resolve_budget(info, p, cfg, warmup)
    cascade = _resolve_cascade(p, cfg) if p.get("cascade") is not None else None
    rest = {k: v for k, v in p.items() if k not in PRUNE_KEYS}
    rest.setdefault("seed", cfg.seed)  # the mask generator follows the run's seed unless set explicitly
    try:
        if cascade is not None:
            s = 1.0 - cascade.ratios[-1]
        elif rest.get("pattern") is not None:  # N:M: the pattern implies the sparsity, a given one must fit it
            s = pattern_sparsity(rest["pattern"], p.get("sparsity"), p.get("density"), p.get("compression"))
        else:
            s = resolve_sparsity(p.get("sparsity"), p.get("density"), p.get("compression"))
        common, method_opts = split_options(info, rest)
    except PrunekitError as e:
        raise ConfigError(f"section 'prune': {e}") from None
    common = dataclasses.replace(common, rounds=common.rounds or info.default_rounds)
    gradual = _resolve_gradual(p.get("gradual"), s, warmup, cfg.train.epochs)
    samples, transform = _resolve_scoring(info, p) if scores_with_data(info) else (None, None)
    return ResolvedPrune(info, s, common, method_opts, warmup=warmup, samples=samples, score_transform=transform,
                         gradual=gradual, cascade=cascade,
                         reconstruction=_resolve_reconstruction(p.get("reconstruction"), gradual, cascade))


def _resolve_budget(info: MethodInfo, p: dict, cfg: ExperimentConfig, warmup: int) -> ResolvedPrune:
    """A one-shot prune section with a compute budget (``macs``, ``speedup`` or ``latency``, with
    ``latency_batch`` and ``budget_tol``) instead of a sparsity: pruned once after ``warmup`` epochs by
    :func:`prunekit.flops_target.prune_by_budget`."""
    for key in ("sparsity", "density", "compression", "gradual", "cascade"):
        if p.get(key) is not None:
            raise ConfigError(f"field 'prune.{key}' does not combine with a compute budget (prune.macs, "
                              "prune.speedup or prune.latency): the budget chooses the sparsity in one pruning "
                              f"step; remove one of them")
    rest = {k: v for k, v in p.items() if k not in PRUNE_KEYS}
    rest.setdefault("seed", cfg.seed)
    if rest.get("pattern") is not None:
        raise ConfigError("field 'prune.pattern' fixes the sparsity (1 - N/M), so it does not combine with a "
                          "compute budget; remove one of them")
    if rest.get("rounds") not in (None, 1):
        raise ConfigError(f"field 'prune.rounds': a compute budget is met in one pruning step, got "
                          f"{rest['rounds']!r}; remove it")
    try:
        budget = Budget.of(*(p.get(k) for k in BUDGET_KEYS))
        if budget.cost == "latency" and not info.structured:
            raise PrunekitError(f"a latency budget predicts the latency of the shrunk model, so it needs a "
                                f"structured method (filter_l1, filter_l2, filter_random, bn_scale, pfp), got "
                                f"{info.name!r}")
        common, method_opts = split_options(info, rest)
    except PrunekitError as e:
        raise ConfigError(f"section 'prune': {e}") from None
    common = dataclasses.replace(common, rounds=1)
    samples, transform = _resolve_scoring(info, p) if scores_with_data(info) else (None, None)
    return ResolvedPrune(info, None, common, method_opts, warmup=warmup, samples=samples, score_transform=transform,
                         reconstruction=_resolve_reconstruction(p.get("reconstruction"), None, None), budget=budget)


def _resolve_reconstruction(n, gradual, cascade) -> int | None:
    """``prune.reconstruction: N``: after the (one-shot) pruning, the layer and output reconstruction errors of the
    pruned model against its weights just before it, on the first N validation samples
    (:mod:`prunekit.families.layerwise.reconstruction`)."""
    if n is None:
        return None
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"field 'prune.reconstruction': expected a number of validation samples >= 1 (e.g. 128), "
                          f"got {n!r}")
    if gradual is not None or cascade is not None:
        raise ConfigError("field 'prune.reconstruction': measured against the weights before a one-shot pruning; "
                          "a gradual schedule or a cascade has no single such point (leave reconstruction out)")
    return n


def scores_with_data(info: MethodInfo) -> bool:
    """Whether ``info``'s method scores with data (its ``samples`` and ``score_transform`` apply)."""
    return info.needs_data in ("inputs", "labels")


def _resolve_dense(info: MethodInfo, p: dict, cfg: ExperimentConfig) -> ResolvedPrune:
    """The dense baseline ignores every pruning option, so it neither checks their values nor lets them into its
    identity (all configs of it are one run, and a method grid's shared prune section fits it); a key that no
    method has is still a typo, said as for any method."""
    try:
        _check_option_names({k: v for k, v in p.items() if k not in PRUNE_KEYS})
        common, method_opts = split_options(info, {"seed": cfg.seed})
    except PrunekitError as e:
        raise ConfigError(f"section 'prune': {e}") from None
    common = dataclasses.replace(common, rounds=common.rounds or info.default_rounds)
    return ResolvedPrune(info, 0.0, common, method_opts)


def _resolve_gradual(gradual, sparsity: float, warmup: int, epochs: int) -> Gradual | None:
    """``prune.gradual`` as a :class:`Gradual` schedule to ``sparsity``, checked against warm-up and training."""
    if gradual is None:
        return None
    if not isinstance(gradual, dict):
        raise ConfigError("field 'prune.gradual': expected a mapping {start, freq, end, initial_sparsity, ...}")
    if "target_sparsity" in gradual:
        raise ConfigError("field 'prune.gradual.target_sparsity': the target is prune.sparsity; remove it here")
    sched = from_dict(Gradual, {"target_sparsity": sparsity, **gradual}, "prune.gradual")
    sched.validate("prune.gradual", ConfigError)
    if warmup:
        raise ConfigError("prune.warmup and prune.gradual exclude each other: a gradual schedule starts at "
                          "gradual.start")
    if sched.end >= epochs:
        raise ConfigError(f"field 'prune.gradual.end': the last pruning step (epoch {sched.end}) must come before "
                          f"the end of training; set train.epochs to at least {sched.end + 1}")
    return sched


def _resolve_scoring(info: MethodInfo, p: dict) -> tuple[Any, str]:
    """(samples, score_transform) of a method that scores with data (:mod:`prunekit.data.scoring`)."""
    samples = p.get("samples", info.default_samples)
    transform = p.get("score_transform", "eval")
    try:
        check_samples(samples)
    except PrunekitError as e:
        raise ConfigError(f"field 'prune.samples': {e}") from None
    if transform not in ("eval", "train"):
        raise ConfigError(f"field 'prune.score_transform': {transform!r} is not one of 'eval', 'train'")
    return samples, transform


def _check_option_names(options: dict) -> None:
    """Raise for a prune option that no method has (the dense baseline's only check of its ignored options)."""
    known = {f.name for f in dataclasses.fields(PruneOptions)}
    for info in methods():
        known.update(info.option_names())
    for key in options:
        if key not in known:
            near = closest(str(key), sorted(known | set(PRUNE_KEYS)))
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise PrunekitError(f"unknown option {key!r}: no method has it{hint}; `prunekit methods METHOD` lists "
                                "a method's options")


def _resolve_cascade(p: dict, cfg: ExperimentConfig) -> ResolvedCascade:
    """``prune.cascade``, checked, with its keep ratios written out."""
    for key in ("sparsity", "density", "compression", "warmup", "gradual"):
        if p.get(key) not in (None, 0):
            raise ConfigError(f"field 'prune.{key}' does not combine with prune.cascade: the cascade's keep ratios "
                              "set the sparsity, and its level 0 is the dense training; remove it")
    if not isinstance(p["cascade"], dict):
        raise ConfigError("field 'prune.cascade': expected a mapping {ratios | start, end, n, spacing, "
                          "retrain_iterations, retrain_epochs}")
    c = from_dict(Cascade, p["cascade"], "prune.cascade")
    c.validate("prune.cascade", ConfigError)
    if cfg.train.epochs < 1:
        raise ConfigError("prune.cascade trains the dense network first: set train.epochs >= 1")
    return ResolvedCascade(tuple(c.keep_ratios()), c.retrain_iterations, c.retrain_epochs)


def _resolve_levels(info: MethodInfo, p: dict, cfg: ExperimentConfig) -> ResolvedPrune:
    """The prune section of an IMP code (lth, sap, ciap, giap): its options, checked; no target sparsity."""
    for key in ("sparsity", "density", "compression", "warmup", "gradual", "samples", "score_transform") + BUDGET_KEYS:
        if p.get(key) is not None:
            hint = ("its final sparsity follows from levels and prune_fraction (lth) or the PQ rule (sap, ciap, giap)"
                    if key in ("sparsity", "density", "compression") + BUDGET_KEYS else
                    "rewind: step:<k>ep is the IMP form of dense warm-up" if key == "warmup" else
                    "IMP prunes between training levels, with no scoring data")
            raise ConfigError(f"field 'prune.{key}' does not apply to {info.name!r}: {hint}; remove it")
    if p.get("reconstruction") is not None:
        raise ConfigError(f"field 'prune.reconstruction' does not apply to {info.name!r}: it is measured after a "
                          "one-shot pruning, and IMP prunes between training levels; remove it")
    rest = {k: v for k, v in p.items() if k not in PRUNE_KEYS}
    rest.setdefault("seed", cfg.seed)
    rest.setdefault("scope", DEFAULT_SCOPE[info.name])
    try:
        common, opts = split_options(info, rest)
        check_imp_options(info.name, opts, cfg.train.epochs)
    except PrunekitError as e:
        raise ConfigError(f"section 'prune': {e}") from None
    return ResolvedPrune(info, None, common, opts)
