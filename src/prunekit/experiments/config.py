"""Typed experiment configs (YAML or JSON), validated with errors that name the bad field and the allowed values.

A config file holds one experiment, optionally with a ``grid`` of values that expands into several::

    name: quickstart
    model: lenet_300_100            # or {name: lenet_300_100}
    data: mnist                     # or {name: mnist, subset: 10000}
    train: {epochs: 6, optimizer: sgd, lr: 0.05, momentum: 0.9}
    prune: {method: magnitude, sparsity: 0.9, scope: global}
    seed: 0
    grid:
      prune.method: [none, random, magnitude]
      prune.sparsity: [0.9, 0.98]

A grid entry that is a mapping is merged into the section it names, which gives each method its own options::

    grid:
      prune:
        - {method: woodfisher, fisher_samples: 8000}
        - {method: magni}

``prune`` takes ``method``, one of ``sparsity`` / ``density`` / ``compression``, ``warmup`` (epochs of dense
training before the mask) or ``gradual`` (a :class:`prunekit.schedules.Gradual` schedule without its target, which
is the sparsity), ``samples`` and ``score_transform`` (the scoring set of data-dependent methods, see
:mod:`prunekit.data.scoring`), the options every method shares (``scope``, ``rounds``, ...) and the method's own
options, all flat. :func:`resolve` fills in every default, so configs that mean the same run hash the same.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, PrunekitError
from ..train.config import TrainConfig
from ..typed import from_dict, to_dict


@dataclass(frozen=True)
class ModelSection:
    """``pretrained``: start from trained weights, either a config file of the dense (or pruned) run to start from,
    which is run first when the store does not have it yet, or a model file written by ``prunekit.save``.
    ``weights``: the ``final`` weights of that run or its ``best`` validation checkpoint. Masks come along."""

    name: str = "lenet_300_100"
    pretrained: str | None = None
    weights: Literal["final", "best"] = "final"


@dataclass(frozen=True)
class DataSection:
    """``val_size``: hold-out size (count, or fraction if < 1; None = the dataset's default split);
    ``subset``: a class-balanced subset of the training split (quick runs); ``augment``: None = dataset default;
    ``resize``: resize every image to ``resize`` x ``resize`` once at load (bilinear; e.g. MNIST at 32 for VGG)."""

    name: str = "mnist"
    val_size: float | None = None
    subset: int | None = None
    augment: bool | None = None
    split_seed: int = 42
    resize: int | None = None


@dataclass(frozen=True)
class ReportSection:
    plot: bool = True
    metric: str = "test_acc"


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    seed: int = 0
    grid: dict[str, list] = field(default_factory=dict)
    report: ReportSection = field(default_factory=ReportSection)


# Keys of the prune section that are not options of prunekit.prune.
_PRUNE_KEYS = ("method", "sparsity", "density", "compression", "warmup", "samples", "score_transform", "gradual",
               "cascade")


def _shorthand(data: dict) -> dict:
    data = dict(data)
    for key in ("model", "data"):
        if isinstance(data.get(key), str):
            data[key] = {"name": data[key]}
    return data


def translate(data: dict) -> dict:
    """``data`` with the seeds' own layouts written as prunekit fields: seed 000's JSON sections
    (:mod:`.seed000`) and seed 001's flags (:mod:`.seed001`); identity for a prunekit config."""
    from . import seed000, seed001

    return seed001.translate(seed000.translate(data))


def parse(data: dict) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from plain data (the grid is kept, not expanded)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections (model, data, train, prune, ...), got {type(data).__name__}")
    cfg = from_dict(ExperimentConfig, _shorthand(translate(data)))
    for key in cfg.grid:
        _check_grid_key(key)
    return cfg


def _check_grid_key(key: str) -> None:
    head = key.split(".")[0]
    fields = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name != "grid"]
    if head not in fields:
        raise ConfigError(f"grid key {key!r} does not name a config field; top-level fields: {', '.join(fields)}")


def load(path: str | Path) -> dict:
    """Plain data from a YAML or JSON config file (one-line errors for missing files and syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parser error is the user's config
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {first}") from None
    if data is None:
        raise ConfigError(f"{path}: the config is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections (model, data, train, prune, ...)")
    from . import seed000

    if seed000.is_seed000(data):  # checked now (one-line errors) and said once per file, not at every parse
        import sys

        lines = seed000.notes(data)
        print(f"note: {path} is in seed 000's layout (general/dataset/model/training/validation), translated to "
              "prunekit's fields" + "".join(f"\n  {line}" for line in lines), file=sys.stderr)
    return data


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalar/list syntax (``0.9``, ``true``, ``[0.9, 0.98]``, ``sgd``)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except Exception:  # noqa: BLE001
        return text


def set_path(data: dict, dotted: str, value: Any) -> dict:
    """Return a copy of ``data`` with ``a.b.c = value`` (creating sections as needed). Under ``grid`` the rest of
    the path is one grid key: ``grid.prune.method=[...]`` sets the grid entry ``prune.method``."""
    out = copy.deepcopy(data)
    keys = dotted.split(".")
    if keys[0] == "grid" and len(keys) > 2:  # grid keys are dotted field paths: grid.prune.method -> "prune.method"
        keys = ["grid", ".".join(keys[1:])]
    node = out
    for k in keys[:-1]:
        nxt = node.get(k)
        if isinstance(nxt, str) and k in ("model", "data"):
            nxt = {"name": nxt}
        if nxt is None:
            nxt = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {dotted!r}: {k!r} is not a section")
        node[k] = nxt
        node = nxt
    node[keys[-1]] = value
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides (the CLI's ``--set``)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. --set train.epochs=3), got {item!r}")
        key, _, text = item.partition("=")
        data = set_path(data, key.strip(), parse_value(text.strip()))
    return data


def expand(data: dict) -> list[dict]:
    """The grid's cartesian product as plain configs without ``grid`` (a config without a grid yields itself)."""
    data = translate(data)  # seed 000's JSON sections and seed 001's flags (net_arch, ...) as prunekit fields
    cfg = parse(data)  # validates the grid keys and everything else
    base = {k: v for k, v in data.items() if k != "grid"}
    if not cfg.grid:
        return [base]
    keys = list(cfg.grid)
    for k in keys:
        if not isinstance(cfg.grid[k], list) or not cfg.grid[k]:
            raise ConfigError(f"grid field {k!r} must be a non-empty list of values")
    out = []
    for values in itertools.product(*(cfg.grid[k] for k in keys)):
        d = base
        for k, v in zip(keys, values):
            d = merge_path(d, k, v) if isinstance(v, dict) else set_path(d, k, v)
        out.append(d)
    return out


def merge_path(data: dict, dotted: str, values: dict) -> dict:
    """Return a copy of ``data`` with the mapping ``values`` merged into the section at ``dotted`` (a grid entry
    such as ``{method: woodfisher, fisher_samples: 8000}`` for ``prune`` sets those keys and keeps the others)."""
    for key, value in values.items():
        data = set_path(data, f"{dotted}.{key}", value)
    return data


def resolve(data: dict | ExperimentConfig) -> dict:
    """Fully resolved plain config (every default filled in, names canonical) of ONE run (no grid)."""
    from ..models import canonical_name
    from ..prune import resolve_sparsity, split_options
    from ..registry import get_method

    cfg = data if isinstance(data, ExperimentConfig) else parse(data)
    if cfg.grid:
        raise ConfigError("resolve() takes one run; expand the grid first (prunekit.experiments.expand)")
    out = to_dict(cfg)
    out.pop("grid")
    out.pop("report")
    try:
        out["model"]["name"] = canonical_name(cfg.model.name)
    except PrunekitError as e:
        raise ConfigError(f"field 'model.name': {e}") from None
    out["model"] = _resolve_pretrained(out["model"])
    from ..data import dataset_names

    if cfg.data.name not in dataset_names():
        from ..errors import unknown

        raise ConfigError(f"field 'data.name': {unknown('dataset', cfg.data.name, dataset_names())}")
    p = dict(cfg.prune)
    if "method" not in p:
        raise ConfigError("missing required field 'prune.method' (e.g. magnitude; `prunekit methods` lists them)")
    try:
        info = get_method(p["method"])
    except PrunekitError as e:
        raise ConfigError(f"field 'prune.method': {e}") from None
    if info.needs_data == "training":
        out["prune"] = _resolve_imp(info, p, cfg)
        return out
    warmup = p.get("warmup", 0)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ConfigError(f"field 'prune.warmup': expected a whole number of epochs >= 0, got {warmup!r}")
    if warmup > cfg.train.epochs:
        raise ConfigError(f"field 'prune.warmup': {warmup} epochs of warm-up exceed train.epochs={cfg.train.epochs}")
    cascade = _resolve_cascade(p, cfg) if p.get("cascade") is not None and info.name != "none" else None
    try:
        if info.name == "none":
            s = 0.0
        elif cascade is not None:
            s = 1.0 - cascade["ratios"][-1]
        else:
            s = resolve_sparsity(p.get("sparsity"), p.get("density"), p.get("compression"))
        rest = {k: v for k, v in p.items() if k not in _PRUNE_KEYS}
        rest.setdefault("seed", cfg.seed)  # the mask generator follows the run's seed unless set explicitly
        common, method_opts = split_options(info, rest)
    except PrunekitError as e:
        raise ConfigError(f"section 'prune': {e}") from None
    if info.name == "none":  # the dense baseline ignores every pruning option: all configs of it are one run
        common, method_opts = split_options(info, {"seed": cfg.seed})
    common = dataclasses.replace(common, rounds=common.rounds or info.default_rounds)
    gradual = p.get("gradual")
    if gradual is not None and info.name != "none":
        from ..schedules import Gradual

        if not isinstance(gradual, dict):
            raise ConfigError("field 'prune.gradual': expected a mapping {start, freq, end, initial_sparsity, ...}")
        if "target_sparsity" in gradual:
            raise ConfigError("field 'prune.gradual.target_sparsity': the target is prune.sparsity; remove it here")
        sched = from_dict(Gradual, {"target_sparsity": s, **gradual}, "prune.gradual")
        sched.validate("prune.gradual", ConfigError)
        if warmup:
            raise ConfigError("prune.warmup and prune.gradual exclude each other: a gradual schedule starts at "
                              "gradual.start")
        if sched.end >= cfg.train.epochs:
            raise ConfigError(f"field 'prune.gradual.end': the last pruning step (epoch {sched.end}) must come before "
                              f"the end of training; set train.epochs to at least {sched.end + 1}")
        gradual = {k: v for k, v in to_dict(sched).items() if k != "target_sparsity"}
    else:
        gradual = None
    uses_data = info.needs_data in ("inputs", "labels")
    samples = p.get("samples", info.default_samples) if uses_data else None
    transform = p.get("score_transform", "eval") if uses_data else None
    if uses_data:
        from ..data.scoring import check_samples

        try:
            check_samples(samples)
        except PrunekitError as e:
            raise ConfigError(f"field 'prune.samples': {e}") from None
        if transform not in ("eval", "train"):
            raise ConfigError(f"field 'prune.score_transform': {transform!r} is not one of 'eval', 'train'")
    out["prune"] = {
        "method": info.name,
        "sparsity": s,
        "warmup": warmup if info.name != "none" else 0,
        "samples": samples,
        "score_transform": transform,
        "gradual": gradual,
        "options": to_dict(common),
        "method_options": to_dict(method_opts),
        "cascade": cascade,
    }
    return out


def _resolve_cascade(p: dict, cfg: ExperimentConfig) -> dict:
    """``prune.cascade`` with its keep ratios written out (so equal cascades hash equal)."""
    from ..schedules import Cascade

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
    return {"ratios": c.keep_ratios(), "retrain_iterations": c.retrain_iterations,
            "retrain_epochs": c.retrain_epochs}


def _resolve_imp(info, p: dict, cfg: ExperimentConfig) -> dict:
    """The prune section of an IMP code (lth, sap, ciap, giap): its options, checked; no target sparsity."""
    from ..criteria.iterative import DEFAULT_SCOPE, check_imp_options
    from ..prune import split_options

    for key in ("sparsity", "density", "compression", "warmup", "gradual", "samples", "score_transform"):
        if p.get(key) is not None:
            hint = ("its final sparsity follows from levels and prune_fraction (lth) or the PQ rule (sap, ciap, giap)"
                    if key in ("sparsity", "density", "compression") else
                    "rewind: step:<k>ep is the IMP form of dense warm-up" if key == "warmup" else
                    "IMP prunes between training levels, with no scoring data")
            raise ConfigError(f"field 'prune.{key}' does not apply to {info.name!r}: {hint}; remove it")
    rest = {k: v for k, v in p.items() if k not in _PRUNE_KEYS}
    rest.setdefault("seed", cfg.seed)
    rest.setdefault("scope", DEFAULT_SCOPE[info.name])
    try:
        common, opts = split_options(info, rest)
        check_imp_options(info.name, opts, cfg.train.epochs)
    except PrunekitError as e:
        raise ConfigError(f"section 'prune': {e}") from None
    return {"method": info.name, "sparsity": None, "warmup": 0, "samples": None, "score_transform": None,
            "gradual": None, "options": to_dict(common), "method_options": to_dict(opts)}


def _resolve_pretrained(model: dict) -> dict:
    """Replace ``pretrained`` by what identifies it: the run id of a config, or the sha256 of a model file."""
    src, weights = model.pop("pretrained"), model.pop("weights")
    if src is None:
        return model
    path = Path(src)
    if path.suffix in (".pt", ".pth"):
        if not path.is_file():
            raise ConfigError(f"field 'model.pretrained': model file {src!r} not found")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        model["pretrained"] = {"file": str(path), "sha256": digest}
        return model
    data = load(path)
    runs = expand(data)
    if len(runs) != 1:
        raise ConfigError(f"field 'model.pretrained': {src} expands to {len(runs)} runs; point it at a config of "
                          "exactly one run (no grid)")
    pre = resolve(runs[0])
    if pre["model"]["name"] != model["name"]:
        raise ConfigError(f"field 'model.pretrained': {src} trains {pre['model']['name']}, not {model['name']}")
    model["pretrained"] = {"run_id": run_id(pre), "weights": weights, "config": runs[0]}
    return model


#: Resolved fields that do not change a run's result and so are left out of its identity.
NOT_IDENTITY = ("name", "train.progress", "train.device", "train.checkpoint_every", "train.eval_batch_size",
                "train.tensorboard", "model.pretrained.config", "model.pretrained.file")


#: Fields added after runs were first stored: left out of the identity while unset, so older runs keep their ids.
ABSENT_WHEN_NONE = ("prune.gradual", "data.resize", "prune.cascade")


def run_id(resolved: dict) -> str:
    """Identity of a run: a hash of its resolved config, without the fields in :data:`NOT_IDENTITY` (the
    experiment's name, progress display, device choice, checkpoint frequency, evaluation batch size)."""
    ident = copy.deepcopy(resolved)
    for dotted in NOT_IDENTITY + ABSENT_WHEN_NONE:
        *parents, leaf = dotted.split(".")
        node = ident
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if dotted in NOT_IDENTITY or node.get(leaf, 0) is None:
            node.pop(leaf, None)
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
