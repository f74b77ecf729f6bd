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

``prune`` takes ``method``, one of ``sparsity`` / ``density`` / ``compression`` or a compute budget instead
(``macs: 0.5`` of the dense MACs, ``speedup: 2``, or ``latency: 0.5`` of the dense predicted latency with
``latency_batch``; ``budget_tol``; see :class:`prunekit.flops_target.Budget`), ``warmup`` (epochs of dense
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
import sys
from dataclasses import dataclass, field
from json.decoder import scanstring
from pathlib import Path
from typing import Any, Literal

import yaml

from ..compat import fts_json, incop_flags
from ..errors import ConfigError, PrunekitError
from ..models import canonical_name
from ..train.config import TrainConfig
from ..typed import from_dict
from .resolved import (ABSENT_WHEN_NONE, NOT_IDENTITY, PRUNE_KEYS, Pretrained, PretrainedFile, PretrainedRun,
                       ResolvedModel, ResolvedRun, hf_source, resolve_prune, run_id)
from .sources import check_data, resolve_hf, resolve_zoo

__all__ = ["ExperimentConfig", "ModelSection", "PretrainedSource", "DataSection", "ReportSection", "ResolvedRun",
           "PRUNE_KEYS",
           "NOT_IDENTITY", "ABSENT_WHEN_NONE", "NAME_CHARS", "translate", "parse", "check_name", "file_stem", "load",
           "loads", "parse_value", "set_path", "apply_overrides", "expand", "check_grid", "merge_path", "resolve",
           "resolve_run", "run_id"]


@dataclass(frozen=True)
class PretrainedSource:
    """``model.pretrained`` as a mapping: where the starting weights come from.

    - ``source: hf``: a Hugging Face encoder, ``name`` a fetched model (``minilm``: ``prunekit models fetch
      minilm``) or a local folder with ``config.json``, ``model.safetensors`` and ``tokenizer.json``; the model is a
      :class:`prunekit.hf.TextClassifier` (the encoder, mean pooling, a new Linear head) and a text dataset is
      tokenized with the folder's tokenizer. ``model.name`` is then not used (leave it out).
    - ``source: zoo``: the published weights of a zoo model (``efficientnet_lite0``: ImageNet-1k), ``name``
      defaulting to ``model.name``; a head of another size is new.
    - ``source: file`` (``path``: a ``prunekit.save`` file) and ``source: run`` (``path``: the config of the run to
      start from): the same as the plain-string forms.

    ``init: random`` builds the same architecture with fresh weights: the from-scratch reference that shows what
    pretraining is worth (hf and zoo sources)."""

    source: Literal["hf", "zoo", "file", "run"]
    name: str | None = None
    path: str | None = None
    init: Literal["pretrained", "random"] = "pretrained"


@dataclass(frozen=True)
class ModelSection:
    """``pretrained``: start from trained weights, either a config file of the dense (or pruned) run to start from,
    which is run first when the store does not have it yet, or a model file written by ``prunekit.save``, or a
    :class:`PretrainedSource` mapping (a Hugging Face encoder, a zoo model's published weights).
    ``weights``: the ``final`` weights of that run or its ``best`` validation checkpoint. Masks come along."""

    name: str = "lenet_300_100"
    pretrained: str | PretrainedSource | None = None
    weights: Literal["final", "best"] = "final"


@dataclass(frozen=True)
class DataSection:
    """``val_size``: hold-out size (count, or fraction if < 1; None = the dataset's default split);
    ``subset``: a class-balanced subset of the training split (quick runs); ``augment``: None = dataset default;
    ``resize``: resize every image to ``resize`` x ``resize`` once at load (bilinear; e.g. MNIST at 32 for VGG);
    ``channels``: repeat one-channel images to that many channels (grayscale data for an RGB model);
    ``test_size``: evaluate on a stratified, seeded subset of that many test samples (slow models on CPU);
    ``max_length``: tokens per text of a text dataset (default :data:`prunekit.data.DEFAULT_MAX_LENGTH`)."""

    name: str = "mnist"
    val_size: float | None = None
    subset: int | None = None
    augment: bool | None = None
    split_seed: int = 42
    resize: int | None = None
    channels: int | None = None
    test_size: int | None = None
    max_length: int | None = None


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


#: Deprecated name of :data:`PRUNE_KEYS` (the keys of the prune section that are not options of prunekit.prune).


def _shorthand(data: dict) -> dict:
    data = dict(data)
    for key in ("model", "data"):
        if isinstance(data.get(key), str):
            data[key] = {"name": data[key]}
    return data


def translate(data: dict) -> dict:
    """``data`` with the seeds' own layouts written as prunekit fields: seed 000's JSON sections
    (:mod:`prunekit.compat.fts_json`) and seed 001's flags (:mod:`prunekit.compat.incop_flags`); identity for a
    prunekit config."""
    return incop_flags.translate(fts_json.translate(data))


def parse(data: dict) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from plain data (the grid is kept, not expanded)."""
    if not isinstance(data, dict):
        raise ConfigError("a config must be a mapping of sections (model, data, train, prune, ...), got "
                          f"{type(data).__name__}")
    cfg = from_dict(ExperimentConfig, _shorthand(translate(data)))
    check_name(cfg.name, "field 'name'" + (" (seed 000: general.id)" if fts_json.is_seed000(data) else ""))
    for key in cfg.grid:
        _check_grid_key(key)
    return cfg


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
    if fts_json.is_seed000(data):  # checked now (one-line errors) and said once per file, not at every parse
        try:
            lines = fts_json.notes(data)
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
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
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


class _UniqueKeyLoader(yaml.SafeLoader):
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


def resolve_run(data: dict | ExperimentConfig) -> ResolvedRun:
    """The :class:`ResolvedRun` of ONE run (no grid): every default filled in, names canonical, options split and
    checked. A ``model.pretrained`` config is resolved here too, once (it is kept in the result)."""
    cfg = data if isinstance(data, ExperimentConfig) else parse(data)
    if cfg.grid:
        raise ConfigError("resolve() takes one run; expand the grid first (prunekit.experiments.expand)")
    pre_src = cfg.model.pretrained
    if isinstance(pre_src, PretrainedSource) and pre_src.source == "hf":
        model = resolve_hf(pre_src, cfg.model.name if cfg.model.name != ModelSection.name else None)
    else:
        start = _start_run(cfg.model)  # resolved once, here
        if start is not None and hf_source(start.resolved.model) is not None:  # a run that fine-tuned an encoder
            if cfg.model.name != ModelSection.name:
                raise ConfigError(f"field 'model.name' ({cfg.model.name!r}) is not used when starting from a run of "
                                  "a Hugging Face encoder (that run's model is used): remove it")
            model = ResolvedModel(start.resolved.model.name, start)
        else:
            try:
                name = canonical_name(cfg.model.name)
            except PrunekitError as e:
                raise ConfigError(f"field 'model.name': {e}") from None
            if start is not None and start.resolved.model.name != name:
                raise ConfigError(f"field 'model.pretrained': {cfg.model.pretrained} trains "
                                  f"{start.resolved.model.name}, not {name}")
            model = ResolvedModel(name, start if start is not None else _resolve_pretrained(cfg.model, name))
    check_data(cfg.data, model)
    return ResolvedRun(cfg.name, model, cfg.data, cfg.train, resolve_prune(cfg), cfg.seed)


def _start_run(model: ModelSection) -> PretrainedRun | None:
    """``model.pretrained`` naming the config of a run to start from (a path or ``{source: run, path}``), resolved;
    None for any other source."""
    src = model.pretrained
    if isinstance(src, PretrainedSource):
        if src.source != "run" or src.path is None:
            return None
        if src.init != "pretrained":
            raise ConfigError("field 'model.pretrained.init': 'random' applies to hf and zoo sources")
        src = src.path
    if src is None or Path(src).suffix in (".pt", ".pth"):
        return None
    return _resolve_pretrained(model, None)





def resolve(data: dict | ExperimentConfig) -> dict:
    """Fully resolved plain config (every default filled in, names canonical) of ONE run (no grid): the plain form
    of :func:`resolve_run`, which is what identifies the run (:func:`run_id`) and what the store holds."""
    return resolve_run(data).to_dict()


def _resolve_pretrained(model: ModelSection, name: str | None) -> Pretrained | None:
    """What identifies ``model.pretrained``: the sha256 of a model file, the run of a config (resolved), the pinned
    sha256 of a zoo model's published weights."""
    src = model.pretrained
    if src is None:
        return None
    if isinstance(src, PretrainedSource):
        if src.source == "zoo":
            return resolve_zoo(src, name)
        if src.path is None:
            raise ConfigError(f"field 'model.pretrained.path': source {src.source!r} needs the path of "
                              + ("a prunekit.save model file" if src.source == "file" else "a run's config file"))
        if src.init != "pretrained":
            raise ConfigError("field 'model.pretrained.init': 'random' applies to hf and zoo sources")
        src = src.path
    path = Path(src)
    if path.suffix in (".pt", ".pth"):
        if not path.is_file():
            raise ConfigError(f"field 'model.pretrained': model file {src!r} not found")
        return PretrainedFile(str(path), hashlib.sha256(path.read_bytes()).hexdigest())
    data = load(path)
    runs = expand(data)
    if len(runs) != 1:
        raise ConfigError(f"field 'model.pretrained': {src} expands to {len(runs)} runs; point it at a config of "
                          "exactly one run (no grid)")
    pre = resolve_run(runs[0])
    if name is not None and pre.model.name != name:
        raise ConfigError(f"field 'model.pretrained': {src} trains {pre.model.name}, not {name}")
    return PretrainedRun(pre.id, model.weights, runs[0], pre)
