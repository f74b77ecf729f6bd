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
import functools
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
    check_name(cfg.name, "field 'name'" + (" (seed 000: general.id)" if _is_seed000(data) else ""))
    for key in cfg.grid:
        _check_grid_key(key)
    return cfg


def _is_seed000(data) -> bool:
    from . import seed000

    return seed000.is_seed000(data)


#: Characters an experiment name may hold besides letters and digits (it names plot files under --root).
NAME_CHARS = "._-"


def check_name(name, where: str = "field 'name'") -> str:
    """``name`` if it is a plain experiment name: letters, digits and ``._-``, not starting with a dot. Such a name
    can name files (``ROOT/<name>.png``) without leaving their folder; anything else is a :class:`ConfigError`."""
    if isinstance(name, str) and name and not name.startswith(".") \
            and all(c.isalnum() or c in NAME_CHARS for c in name):
        return name
    if not isinstance(name, str) or not name:
        why = "is empty" if name == "" else f"is not a text ({type(name).__name__})"
    elif "/" in name or "\\" in name:
        why = "holds a path separator"
    elif name.startswith("."):
        why = "starts with a dot"
    else:
        bad = sorted({c for c in name if not (c.isalnum() or c in NAME_CHARS)})
        why = "holds " + ", ".join(repr(c) for c in bad)
    raise ConfigError(f"{where}: {name!r} {why}; an experiment name names its plots under --root, so it must be a "
                      "plain name of letters, digits, '.', '_' and '-', not starting with a dot (e.g. "
                      "mnist_pai)")


def file_stem(name: str) -> str:
    """A file name stem for ``name`` that stays in its folder: characters outside letters, digits and ``._-``
    become ``_``, and a leading dot ``_`` (names stored by older versions were not checked)."""
    stem = "".join(c if c.isalnum() or c in NAME_CHARS else "_" for c in str(name)) or "_"
    return "_" + stem[1:] if stem.startswith(".") else stem


def _check_grid_key(key: str) -> None:
    head = key.split(".")[0]
    fields = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name != "grid"]
    if head not in fields:
        raise ConfigError(f"grid key {key!r} does not name a config field; top-level fields: {', '.join(fields)}")


def load(path: str | Path) -> dict:
    """Plain data from a YAML or JSON config file. Every mistake is a one-line :class:`ConfigError` that names the
    file: missing, not UTF-8 (with the byte offset and line), a syntax error (with its line and column), a key given
    twice in one mapping (with both lines), empty, or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    text = _decode(path, raw)
    kind = "JSON" if path.suffix == ".json" else "YAML"
    data = loads(text, kind, str(path))
    if data is None:
        raise ConfigError(f"{path}: the config is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections (model, data, train, prune, ...)")
    from . import seed000

    if seed000.is_seed000(data):  # checked now (one-line errors) and said once per file, not at every parse
        import sys

        try:
            lines = seed000.notes(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        print(f"note: {path} is in seed 000's layout (general/dataset/model/training/validation), translated to "
              "prunekit's fields" + "".join(f"\n  {line}" for line in lines), file=sys.stderr)
    return data


def _decode(path: Path, raw: bytes) -> str:
    """The text of a config file: UTF-8 (a byte-order mark is dropped), or an error naming the first bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}, line {line}, "
                          f"column {column}): save the file as UTF-8") from None


def loads(text: str, kind: str = "YAML", where: str = "<config>"):
    """Parse YAML (``yaml.safe_load`` semantics) or JSON config text; syntax errors and duplicate keys are one-line
    :class:`ConfigError` s that name ``where`` and the line."""
    if kind == "JSON":
        try:
            return json.loads(text, object_pairs_hook=_unique_pairs)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}, line {e.lineno}, column {e.colno}: not valid JSON: {e.msg}; fix the "
                              "syntax there") from None
        except _DuplicateKey:
            key, first, second, section = _json_duplicate(text)
            raise ConfigError(_duplicate_message(where, key, first, second, section)) from None
    import yaml

    try:
        return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise ConfigError(_duplicate_message(where, e.key, e.first, e.second)) from None
    except yaml.MarkedYAMLError as e:
        raise ConfigError(_yaml_message(where, e)) from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: not valid YAML: {first}") from None


def _yaml_message(where: str, e) -> str:
    mark = e.problem_mark or e.context_mark
    at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = (e.problem or e.context or type(e).__name__).strip()
    msg = f"{where}{at}: not valid YAML: {problem}"
    if e.context and e.problem:
        cm = e.context_mark
        msg += f" ({e.context.strip()}" + (f" that starts at line {cm.line + 1}, column {cm.column + 1})"
                                           if cm is not None and cm is not mark else ")")
    if "\t" in problem or "\\t" in problem:
        msg += "; YAML indents with spaces, not tabs"
    return msg + "; fix the syntax there"


def _duplicate_message(where: str, key, first: int, second: int, section: str = "") -> str:
    inside = f" in {section!r}" if section else ""
    lines = f"twice on line {first}" if first == second else f"on lines {first} and {second}"
    return (f"{where}: key {key!r} is given twice{inside} ({lines}); only one value can hold: remove or rename one "
            "of them")


class _DuplicateKey(Exception):
    def __init__(self, key=None, first: int = 0, second: int = 0):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


def _unique_pairs(pairs: list) -> dict:
    """``object_pairs_hook`` of JSON configs: a dict, or :class:`_DuplicateKey` when a key repeats."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _json_duplicate(text: str) -> tuple[str, int, int, str]:
    """(key, first line, second line, dotted section) of the first key that repeats in one object of valid JSON."""
    from json.decoder import scanstring

    stack: list[tuple[dict | None, str]] = []  # per open container: {key: line} of an object (None: an array), path
    expect_key, last_key, i = False, "", 0
    while i < len(text):
        c = text[i]
        if c == '"':
            s, end = scanstring(text, i + 1)
            if expect_key and stack and stack[-1][0] is not None:
                keys, path = stack[-1]
                line = text.count("\n", 0, i) + 1
                if s in keys:
                    return s, keys[s], line, path
                keys[s], last_key = line, s
            expect_key, i = False, end
            continue
        if c in "{[":
            parent = stack[-1][1] if stack else ""
            here = f"{parent}.{last_key}".strip(".") if stack and stack[-1][0] is not None else parent
            stack.append(({} if c == "{" else None, here))
            expect_key = c == "{"
        elif c in "}]":
            stack.pop()
            expect_key = False
        elif c == ",":
            expect_key = bool(stack) and stack[-1][0] is not None
        i += 1
    return "?", 0, 0, ""


@functools.lru_cache(maxsize=None)
def _unique_key_loader():
    """A ``yaml.SafeLoader`` subclass (built on first use: PyYAML is imported lazily)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """``yaml.safe_load`` semantics, except that a key given twice in one mapping is an error (PyYAML keeps the
        last value silently). Keys brought in by a merge (``<<: *anchor``) may be overridden, as YAML allows."""

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _value in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.get(key)
                    except TypeError:  # an unhashable key: the base class says so, with its position
                        break
                    if first is not None:
                        raise _DuplicateKey(key, first, key_node.start_mark.line + 1)
                    seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalar/list syntax (``0.9``, ``true``, ``[0.9, 0.98]``, ``sgd``)."""
    try:
        return loads(text, "YAML", "--set value")
    except ConfigError as e:
        if "given twice" in str(e):  # {a: 1, a: 2}: a mistake, not a string
            raise
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
            raise ConfigError(f"--set {item!r} has no '=': the expected form is KEY=VALUE (e.g. --set train.epochs=3)")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r} has no key before '=': the expected form is KEY=VALUE (e.g. --set "
                              "train.epochs=3)")
        if any(not part.strip() for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: the key {key!r} has an empty part between dots; the expected form "
                              "is KEY=VALUE with a dotted field path (e.g. --set prune.sparsity=0.95)")
        data = set_path(data, key, parse_value(text.strip()))
    return data


def expand(data: dict) -> list[dict]:
    """The grid's cartesian product as plain configs without ``grid`` (a config without a grid yields itself)."""
    data = translate(data)  # seed 000's JSON sections and seed 001's flags (net_arch, ...) as prunekit fields
    cfg = check_grid(data)  # validates the grid keys and everything else
    base = {k: v for k, v in data.items() if k != "grid"}
    if not cfg.grid:
        return [base]
    keys = list(cfg.grid)
    out = []
    for values in itertools.product(*(cfg.grid[k] for k in keys)):
        d = base
        for k, v in zip(keys, values):
            d = merge_path(d, k, v) if isinstance(v, dict) else set_path(d, k, v)
        out.append(d)
    return out


def check_grid(data: dict) -> ExperimentConfig:
    """The parsed config of ``data``, after checking that every grid axis is a non-empty list (an empty axis would
    expand to no runs at all, or, in a sweep, to the baselines alone)."""
    cfg = parse(data)
    for k, values in cfg.grid.items():
        if not isinstance(values, list):
            raise ConfigError(f"grid field {k!r} must be a non-empty list of values, got {values!r}")
        if not values:
            raise ConfigError(f"grid field {k!r} is an empty list, which expands to no runs: give it at least one "
                              "value, or remove it from the grid")
    return cfg


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
    rest = {k: v for k, v in p.items() if k not in _PRUNE_KEYS}
    try:
        if info.name == "none":
            # the dense baseline ignores every pruning option, so it neither checks their values nor lets them into
            # its identity (all configs of it are one run, and a method grid's shared prune section fits it); a key
            # that no method has is still a typo, said as for any method
            _check_option_names(rest)
            s = 0.0
            common, method_opts = split_options(info, {"seed": cfg.seed})
        else:
            if cascade is not None:
                s = 1.0 - cascade["ratios"][-1]
            else:
                s = resolve_sparsity(p.get("sparsity"), p.get("density"), p.get("compression"))
            rest.setdefault("seed", cfg.seed)  # the mask generator follows the run's seed unless set explicitly
            common, method_opts = split_options(info, rest)
    except PrunekitError as e:
        raise ConfigError(f"section 'prune': {e}") from None
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


def _check_option_names(options: dict) -> None:
    """Raise for a prune option that no method has (the dense baseline's only check of its ignored options)."""
    from ..prune import PruneOptions
    from ..registry import methods

    known = {f.name for f in dataclasses.fields(PruneOptions)}
    for info in methods():
        known.update(info.option_names())
    for key in options:
        if key not in known:
            from ..errors import closest

            near = closest(str(key), sorted(known | set(_PRUNE_KEYS)))
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise PrunekitError(f"unknown option {key!r}: no method has it{hint}; `prunekit methods METHOD` lists "
                                "a method's options")


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
ABSENT_WHEN_NONE = ("prune.gradual", "data.resize", "prune.cascade", "train.threads")


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
