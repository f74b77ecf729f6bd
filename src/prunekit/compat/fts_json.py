"""Seed 000's JSON experiment files (``exp_configs/*.json`` of the FTS repository) accepted as prunekit configs.

The seed's layout has five sections; each key maps to a prunekit field::

    general.id                        -> name
    general.seed                      -> seed (a list of seeds -> grid over seed)
    general.experiment: pbt           -> (prune before training: the only experiment of the seed)
    general.gpu.ngpus                 -> 0: train.device cpu; >= 1: train.device auto (CUDA when available)
    dataset.class                     -> data.name (cifar10, cifar100; the seed's 80/20 train/validation
                                         split: data.val_size 10000, data.split_seed 42)
    dataset.batch_size                -> train.batch_size
    model.class                       -> model.name (resnet18 -> resnet18, VGG19 -> vgg19_kuangliu)
    model.num_classes                 -> checked against the dataset (prunekit takes it from the data)
    training.num_steps                -> train.epochs (the seed's steps are epochs)
    training.criterion.class: CE      -> (prunekit trains with cross-entropy)
    training.optimizer.class          -> train.optimizer (sgd)
    training.optimizer.learning_rate  -> train.lr
    training.optimizer.momentum       -> train.momentum (plain momentum, no Nesterov, as the seed)
    training.optimizer.w_decay        -> train.weight_decay
    training.optimizer.lr_drops       -> train.lr_schedule multistep, train.milestones (null: constant)
    training.optimizer.lr_drop_factor -> train.gamma
    training.compressor.class         -> prune.method (the seed's codes are prunekit's: `prunekit methods`)
    training.compressor.mask          -> prune.scope (global | layer)
    training.compressor.sparsity      -> prune.sparsity
    training.compressor.warmup        -> prune.warmup
    training.compressor.batch_size    -> prune.batch_size (B of the scoring gradients; methods without data
                                         ignore it, as the seed does)
    validation.metric: acc            -> (prunekit keeps the best-validation-accuracy checkpoint)
    validation.frequency: 1           -> (prunekit validates after every epoch)

The seed never prunes its output layer (``linear``), so the translation sets ``prune.exclude_output: true``.
Names outside the seed's lists pass through as prunekit names (``model.class: lenet_300_100``,
``dataset.class: mnist``; their validation split is the dataset's default), and other keys of
``training.compressor`` that are prunekit prune options (``samples``, ``rounds``, ...) pass through too.

Keys without a prunekit meaning (``general.description``, ``general.output_dir``, ...) are dropped and listed in a
note (:func:`notes`); values that prunekit cannot honour (``validation.metric: f1``, ``model.class: resnet50``, the
seed's CIFAR ResNet-50) are errors that name the key and the fix. prunekit sections given beside the seed's
(``train: {epochs: 1}``, as ``--set train.epochs=1`` writes) take precedence over the translated values.
:func:`translate` is applied by :func:`prunekit.experiments.config.parse` and ``expand`` before anything else.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib

from ..data import dataset_names
from ..errors import ConfigError, PrunekitError
from ..experiments.resolved import PRUNE_KEYS
from ..models import canonical_name
from ..prune import PruneOptions
from ..registry import get_method, methods

#: The seed's top-level sections (besides ``model``, which both layouts have).
SECTIONS = ("general", "dataset", "training", "validation")
#: prunekit's top-level fields (``model`` is shared by both layouts).
NATIVE = ("name", "model", "data", "train", "prune", "seed", "grid", "report")

#: Seed 000 architecture names -> prunekit models (kuangliu/pytorch-cifar definitions in both).
ARCH = {"resnet18": "resnet18", "vgg19": "vgg19_kuangliu"}
#: Seed 000 architectures prunekit does not have (the seed's CIFAR ResNet-50 is not prunekit's ImageNet one).
NO_ARCH = ("cnn500k", "resnet34", "resnet50", "resnet101", "resnet152", "vgg11", "vgg13", "vgg16")
#: Seed 000 datasets; the seed holds out a stratified 20% of the 50,000 training images (split seed 42).
DATASETS = {"cifar10": {"name": "cifar10", "val_size": 10000, "split_seed": 42},
            "cifar100": {"name": "cifar100", "val_size": 10000, "split_seed": 42}}
NUM_CLASSES = {"mnist": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000}

_KNOWN = {
    "general": ("id", "description", "gpu", "experiment", "seed", "output_dir"),
    "dataset": ("class", "batch_size"),
    "model": ("class", "num_classes", "name", "pretrained", "weights"),
    "training": ("num_steps", "criterion", "optimizer", "compressor"),
    "validation": ("metric", "frequency"),
}
_OPTIMIZER = ("class", "learning_rate", "momentum", "w_decay", "lr_drops", "lr_drop_factor")
#: The seed's ``training.compressor`` keys (``percentile`` has no prunekit meaning: a note).
_COMPRESSOR = ("class", "mask", "sparsity", "warmup", "batch_size", "percentile")
_WHY_KEYS = ("percentile",)
_WHY = {
    "general.description": "free text",
    "general.output_dir": "runs go to the results store: --root DIR",
    "general.gpu.gpu_id": "the seed itself uses the current CUDA device; use --device cuda:N",
    "training.compressor.percentile": "not used by the seed's pbt experiment",
}


def is_seed000(data) -> bool:
    """Whether ``data`` is written in seed 000's layout: it has the section ``general``, or one of the seed's
    signature keys (``training.compressor``, ``training.num_steps``, ``dataset.class``, ``model.class``). A prunekit
    config with a misspelt section (``training:`` for ``train:``) is not taken for one: it keeps its error."""
    if not isinstance(data, dict):
        return False

    def has(section: str, *keys: str) -> bool:
        node = data.get(section)
        return isinstance(node, dict) and any(k in node for k in keys)

    return "general" in data or has("training", "compressor", "num_steps") or has("dataset", "class") \
        or has("model", "class")


def notes(data: dict) -> list[str]:
    """The translation notes of a seed-000 config: its keys with no prunekit meaning (dropped) and the prunekit
    values that replace translated ones. Raises :class:`ConfigError` like :func:`translate`."""
    out: list[str] = []
    translate(data, out)
    return out


def _section(data: dict, key: str) -> dict:
    v = data.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"seed 000 config: {key!r} must be a mapping of keys, got {type(v).__name__}")
    return v


def _unknown(section: dict, known, where: str, unknown: list[str]) -> None:
    """Add to ``unknown`` the keys of ``section`` that the seed's layout does not have, each with a did-you-mean
    hint among ``known``."""
    for k in section:
        if k not in known:
            unknown.append(_spelled(f"{where}.{k}" if where else str(k), str(k), known))


def _spelled(dotted: str, key: str, known) -> str:
    near = difflib.get_close_matches(key, [str(k) for k in known], n=1, cutoff=0.6)
    return f"{dotted!r} (did you mean {near[0]!r}?)" if near else repr(dotted)


def _raise_unknown(unknown: list[str]) -> None:
    if unknown:
        keys = list(dict.fromkeys(unknown))
        one = len(keys) == 1
        raise ConfigError(f"seed 000 config: unknown key{'' if one else 's'} {', '.join(keys)}: "
                          f"{'not a key' if one else 'not keys'} of seed 000's layout nor prunekit options, so "
                          f"{'it' if one else 'they'} would be ignored and the run would use the defaults; fix the "
                          f"spelling or remove {'it' if one else 'them'} (docs/seed000_json.md lists the keys)")


class _Translation:
    """One translation under way: the prunekit fields so far (``out``), the seed key each came from (``src``), the
    seed's keys with no prunekit meaning (a note), keys of neither layout (typos: an error) and remarks."""

    def __init__(self) -> None:
        self.out: dict = {}
        self.src: dict[str, str] = {}
        self.ignored: list[str] = []
        self.unknown: list[str] = []
        self.remarks: list[str] = []

    def put(self, section: str | None, key: str, value, seed_key: str) -> None:
        if section is None:
            self.out[key] = value
            self.src[key] = seed_key
        else:
            self.out.setdefault(section, {})[key] = value
            self.src[f"{section}.{key}"] = seed_key

    def check_keys(self, section: dict, known, where: str) -> None:
        _unknown(section, known, where, self.unknown)


def translate(data: dict, note: list[str] | None = None) -> dict:
    """A copy of ``data`` with seed 000's sections replaced by prunekit's fields (identity when there are none).

    ``note``, when given, receives one line per remark: the keys with no prunekit meaning, and the prunekit
    fields given beside the seed's that replace a translated value."""
    if not is_seed000(data):
        return data
    t = _Translation()
    _general(t, _section(data, "general"))
    dataset = _section(data, "dataset")
    ds_name = _dataset(t, dataset)
    native_model = _model(t, data, dataset, ds_name)
    _training(t, _section(data, "training"))
    _validation(t, _section(data, "validation"))
    _native(t, data)
    _raise_unknown(t.unknown)
    if native_model:
        node = t.out.setdefault("model", {})
        for k, v in native_model.items():
            _replace(node, k, v, f"model.{k}", t.src, t.remarks)
    if note is not None:
        if t.ignored:
            note.append("keys with no prunekit meaning (ignored): " + ", ".join(
                f"{k} ({_WHY[k]})" if k in _WHY else k for k in dict.fromkeys(t.ignored)))
        note.extend(t.remarks)
    return t.out


def _general(t: _Translation, general: dict) -> None:
    t.check_keys(general, _KNOWN["general"], "general")
    if "id" in general:
        t.put(None, "name", str(general["id"]), "general.id")
    t.ignored += [f"general.{k}" for k in ("description", "output_dir") if k in general]
    exp = general.get("experiment", "pbt")
    if str(exp).lower() != "pbt":
        raise ConfigError(f"general.experiment={exp!r}: seed 000 has only 'pbt' (prune before training), which is "
                          "what prunekit runs; set it to pbt")
    if "seed" in general:
        s = general["seed"]
        if isinstance(s, list):
            t.out.setdefault("grid", {})["seed"] = list(s)
            t.src["grid.seed"] = "general.seed"
        else:
            t.put(None, "seed", s, "general.seed")
    gpu = general.get("gpu")
    if gpu is not None:
        if not isinstance(gpu, dict):
            raise ConfigError(f"general.gpu must be a mapping {{ngpus, gpu_id}}, got {gpu!r}")
        t.check_keys(gpu, ("ngpus", "gpu_id"), "general.gpu")
        n = gpu.get("ngpus", 1)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"general.gpu.ngpus must be a whole number >= 0, got {n!r}")
        t.put("train", "device", "cpu" if n == 0 else "auto", "general.gpu.ngpus")
        if n > 1:
            t.remarks.append(f"general.gpu.ngpus={n}: prunekit trains on one device, as the seed does")
        if "gpu_id" in gpu:
            t.ignored.append("general.gpu.gpu_id")


def _dataset(t: _Translation, dataset: dict) -> str | None:
    """The ``dataset`` section; returns the prunekit dataset it names (None when it names none)."""
    t.check_keys(dataset, _KNOWN["dataset"], "dataset")
    ds_name = None
    if "class" in dataset:
        key = str(dataset["class"]).lower().replace("-", "").replace("_", "")
        if key in DATASETS:
            t.out["data"] = dict(DATASETS[key])
            t.src.update({f"data.{k}": "dataset.class" for k in DATASETS[key]})
        elif str(dataset["class"]).lower() in dataset_names():
            t.put("data", "name", str(dataset["class"]).lower(), "dataset.class")
        else:
            others = ", ".join(n for n in dataset_names() if n not in DATASETS)
            raise ConfigError(f"dataset.class={dataset['class']!r} is not available in prunekit; use one of "
                              f"cifar10, cifar100 (the seed's) or {others}")
        ds_name = t.out["data"]["name"]
    if "batch_size" in dataset:
        t.put("train", "batch_size", dataset["batch_size"], "dataset.batch_size")
    return ds_name


def _model(t: _Translation, data: dict, dataset: dict, ds_name: str | None) -> dict:
    """The ``model`` section (shared by both layouts); returns its prunekit keys (name, pretrained, weights)."""
    model = data.get("model")
    if isinstance(model, str):
        return {"name": model}
    if model is None:
        return {}
    if not isinstance(model, dict):
        raise ConfigError(f"model must be a mapping {{class, num_classes}}, got {model!r}")
    t.check_keys(model, _KNOWN["model"], "model")
    if "class" in model:
        t.put("model", "name", _arch(model["class"]), "model.class")
    if "num_classes" in model and ds_name in NUM_CLASSES and "data" not in data \
            and model["num_classes"] != NUM_CLASSES[ds_name]:
        raise ConfigError(f"model.num_classes={model['num_classes']!r} does not match dataset.class "
                          f"{dataset['class']!r} ({NUM_CLASSES[ds_name]} classes); prunekit sizes the output "
                          f"layer from the data: set it to {NUM_CLASSES[ds_name]} or remove it")
    return {k: v for k, v in model.items() if k in ("name", "pretrained", "weights")}


def _training(t: _Translation, training: dict) -> None:
    t.check_keys(training, _KNOWN["training"], "training")
    if "num_steps" in training:
        t.put("train", "epochs", training["num_steps"], "training.num_steps")
    crit = training.get("criterion")
    if crit is not None:
        cls = crit.get("class") if isinstance(crit, dict) else crit
        if str(cls).upper() != "CE":
            raise ConfigError(f"training.criterion.class={cls!r}: prunekit trains with cross-entropy only; set it "
                              "to CE")
        if isinstance(crit, dict):
            t.check_keys(crit, ("class",), "training.criterion")
    opt = training.get("optimizer")
    if opt is not None:
        _optimizer(t, opt)
    comp = training.get("compressor")
    if comp is not None:
        if not isinstance(comp, dict):
            raise ConfigError(f"training.compressor must be a mapping {{class, mask, sparsity, warmup, batch_size}}, "
                              f"got {comp!r}")
        _compressor(comp, t)


def _optimizer(t: _Translation, opt) -> None:
    if not isinstance(opt, dict):
        raise ConfigError(f"training.optimizer must be a mapping {{class, learning_rate, ...}}, got {opt!r}")
    t.check_keys(opt, _OPTIMIZER, "training.optimizer")
    if "class" in opt:
        name = str(opt["class"]).lower()
        if name not in ("sgd", "adam", "adamw"):
            raise ConfigError(f"training.optimizer.class={opt['class']!r} is not available; use sgd (the seed's "
                              "only optimizer), adam or adamw")
        t.put("train", "optimizer", name, "training.optimizer.class")
    for key, field in (("learning_rate", "lr"), ("momentum", "momentum"), ("w_decay", "weight_decay")):
        if key in opt:
            t.put("train", field, opt[key], f"training.optimizer.{key}")
    if opt.get("lr_drops"):
        t.put("train", "lr_schedule", "multistep", "training.optimizer.lr_drops")
        t.put("train", "milestones", list(opt["lr_drops"]), "training.optimizer.lr_drops")
        if "lr_drop_factor" in opt:
            t.put("train", "gamma", opt["lr_drop_factor"], "training.optimizer.lr_drop_factor")
        return
    if "lr_drops" in opt:
        t.put("train", "lr_schedule", "constant", "training.optimizer.lr_drops")
    if "lr_drop_factor" in opt:
        t.remarks.append("training.optimizer.lr_drop_factor has no effect without lr_drops (as in the seed)")


def _validation(t: _Translation, val: dict) -> None:
    t.check_keys(val, _KNOWN["validation"], "validation")
    if "metric" in val and str(val["metric"]).lower() != "acc":
        raise ConfigError(f"validation.metric={val['metric']!r}: prunekit keeps the checkpoint of the best validation "
                          "accuracy (test_acc_at_best_val); set it to acc")
    if "frequency" in val and val["frequency"] != 1:
        raise ConfigError(f"validation.frequency={val['frequency']!r}: prunekit validates after every epoch, which "
                          "decides the best-validation checkpoint; set it to 1")


def _native(t: _Translation, data: dict) -> None:
    """prunekit fields given beside the seed's: they take precedence over the translated values (a remark each)."""
    out = t.out
    for key, value in data.items():
        if key in SECTIONS or key == "model":
            continue
        if key not in NATIVE:
            t.unknown.append(_spelled(str(key), str(key), SECTIONS + NATIVE))
            continue
        if isinstance(value, str) and key == "data":
            value = {"name": value}
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            if key == "data" and "name" in value and value["name"] != out["data"].get("name"):
                out["data"] = {}  # another dataset: the seed's split belongs to the seed's dataset
            for k, v in value.items():
                _replace(out[key], k, v, f"{key}.{k}", t.src, t.remarks)
        else:
            _replace(out, key, copy.deepcopy(value), key, t.src, t.remarks)


def _replace(node: dict, key: str, value, dotted: str, src: dict, remarks: list[str]) -> None:
    if key in node and node[key] != value and dotted in src:
        remarks.append(f"{dotted}={value!r} replaces {src[dotted]}'s {node[key]!r}")
    node[key] = copy.deepcopy(value)


def _arch(cls) -> str:
    key = str(cls).lower().replace("-", "").replace("_", "")
    if key in ARCH:
        return ARCH[key]
    if key in NO_ARCH:
        raise ConfigError(f"model.class={cls!r}: prunekit has no model with the seed's {cls} definition; use "
                          "resnet18 or VGG19 (kuangliu, as the seed), or a prunekit model name (`prunekit.models."
                          "model_names()`, e.g. vgg16_bn, resnet20)")
    try:
        return canonical_name(str(cls))
    except PrunekitError as e:
        raise ConfigError(f"model.class={cls!r}: not a seed 000 model (resnet18, VGG19) and {e}") from None


def _compressor(comp: dict, t: _Translation) -> None:
    """``training.compressor`` -> the prune section (class, mask, sparsity, warmup, batch_size and any prunekit
    prune option)."""
    if "class" not in comp:
        raise ConfigError("training.compressor.class is missing: name a compressor code (none, random, magnitude, "
                          "grad_norm, snip, grasp, fisher_diag, fisher_pruner, fts, fbss; `prunekit methods`)")
    try:
        info = get_method(str(comp["class"]))
    except PrunekitError as e:
        raise ConfigError(f"training.compressor.class: {e}") from None
    t.put("prune", "method", info.name, "training.compressor.class")
    if "mask" in comp:
        mask = str(comp["mask"]).lower()
        if mask not in ("global", "layer"):
            raise ConfigError(f"training.compressor.mask={comp['mask']!r} must be 'global' or 'layer'")
        t.put("prune", "scope", mask, "training.compressor.mask")
    for key in ("sparsity", "warmup"):
        if key in comp:
            t.put("prune", key, comp[key], f"training.compressor.{key}")
    dense = info.kind == "dense"
    if not dense:
        # the seed skips every parameter whose name contains "linear": its output layer is never pruned
        t.put("prune", "exclude_output", True, "training.compressor")
    own = set(info.option_names())
    if "batch_size" in comp:
        if "batch_size" in own:
            t.put("prune", "batch_size", comp["batch_size"], "training.compressor.batch_size")
        elif not dense:
            t.remarks.append(f"training.compressor.batch_size={comp['batch_size']!r} has no effect for {info.name!r}, "
                           "which uses no scoring data (as in the seed)")
    shared = {f.name for f in dataclasses.fields(PruneOptions)}
    if dense:  # the dense baseline ignores every method's options (prunekit.experiments.config)
        own = {k for m in methods() for k in m.option_names()}
    for key, value in comp.items():
        if key in _COMPRESSOR:
            if key in _WHY_KEYS:
                t.ignored.append(f"training.compressor.{key}")
            continue
        if key in own or key in shared or key in PRUNE_KEYS:
            t.put("prune", key, value, f"training.compressor.{key}")
        else:  # a typo (sparsty) would prune at the default: said, with the keys it could have meant
            t.unknown.append(_spelled(f"training.compressor.{key}", str(key),
                                    _COMPRESSOR + tuple(own) + tuple(sorted(shared)) + PRUNE_KEYS))
