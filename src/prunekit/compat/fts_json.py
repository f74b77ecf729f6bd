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

from ..errors import ConfigError, PrunekitError

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
    import difflib

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


def translate(data: dict, note: list[str] | None = None) -> dict:
    """A copy of ``data`` with seed 000's sections replaced by prunekit's fields (identity when there are none).

    ``note``, when given, receives one line per remark: the keys with no prunekit meaning, and the prunekit
    fields given beside the seed's that replace a translated value."""
    if not is_seed000(data):
        return data
    ignored: list[str] = []   # the seed's keys that have no prunekit meaning: a note
    unknown: list[str] = []   # keys of neither layout (typos): an error
    remarks: list[str] = []
    out: dict = {}
    src: dict[str, str] = {}  # translated prunekit field -> the seed key it came from

    def put(section: str | None, key: str, value, seed_key: str) -> None:
        if section is None:
            out[key] = value
            src[key] = seed_key
        else:
            out.setdefault(section, {})[key] = value
            src[f"{section}.{key}"] = seed_key

    # ---------------------------------------------------------------------------------------------- general
    general = _section(data, "general")
    _unknown(general, _KNOWN["general"], "general", unknown)
    if "id" in general:
        put(None, "name", str(general["id"]), "general.id")
    ignored += [f"general.{k}" for k in ("description", "output_dir") if k in general]
    exp = general.get("experiment", "pbt")
    if str(exp).lower() != "pbt":
        raise ConfigError(f"general.experiment={exp!r}: seed 000 has only 'pbt' (prune before training), which is "
                          "what prunekit runs; set it to pbt")
    if "seed" in general:
        s = general["seed"]
        if isinstance(s, list):
            out.setdefault("grid", {})["seed"] = list(s)
            src["grid.seed"] = "general.seed"
        else:
            put(None, "seed", s, "general.seed")
    gpu = general.get("gpu")
    if gpu is not None:
        if not isinstance(gpu, dict):
            raise ConfigError(f"general.gpu must be a mapping {{ngpus, gpu_id}}, got {gpu!r}")
        _unknown(gpu, ("ngpus", "gpu_id"), "general.gpu", unknown)
        n = gpu.get("ngpus", 1)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"general.gpu.ngpus must be a whole number >= 0, got {n!r}")
        put("train", "device", "cpu" if n == 0 else "auto", "general.gpu.ngpus")
        if n > 1:
            remarks.append(f"general.gpu.ngpus={n}: prunekit trains on one device, as the seed does")
        if "gpu_id" in gpu:
            ignored.append("general.gpu.gpu_id")

    # ---------------------------------------------------------------------------------------------- dataset
    dataset = _section(data, "dataset")
    _unknown(dataset, _KNOWN["dataset"], "dataset", unknown)
    ds_name = None
    if "class" in dataset:
        from ..data import dataset_names

        key = str(dataset["class"]).lower().replace("-", "").replace("_", "")
        if key in DATASETS:
            out["data"] = dict(DATASETS[key])
            src.update({f"data.{k}": "dataset.class" for k in DATASETS[key]})
        elif str(dataset["class"]).lower() in dataset_names():
            put("data", "name", str(dataset["class"]).lower(), "dataset.class")
        else:
            others = ", ".join(n for n in dataset_names() if n not in DATASETS)
            raise ConfigError(f"dataset.class={dataset['class']!r} is not available in prunekit; use one of "
                              f"cifar10, cifar100 (the seed's) or {others}")
        ds_name = out["data"]["name"]
    if "batch_size" in dataset:
        put("train", "batch_size", dataset["batch_size"], "dataset.batch_size")

    # ------------------------------------------------------------------------------------------------ model
    model = data.get("model")
    native_model: dict = {}
    if isinstance(model, str):
        native_model = {"name": model}
    elif isinstance(model, dict):
        _unknown(model, _KNOWN["model"], "model", unknown)
        native_model = {k: v for k, v in model.items() if k in ("name", "pretrained", "weights")}
        if "class" in model:
            put("model", "name", _arch(model["class"]), "model.class")
        if "num_classes" in model and ds_name in NUM_CLASSES and "data" not in data \
                and model["num_classes"] != NUM_CLASSES[ds_name]:
            raise ConfigError(f"model.num_classes={model['num_classes']!r} does not match dataset.class "
                              f"{dataset['class']!r} ({NUM_CLASSES[ds_name]} classes); prunekit sizes the output "
                              f"layer from the data: set it to {NUM_CLASSES[ds_name]} or remove it")
    elif model is not None:
        raise ConfigError(f"model must be a mapping {{class, num_classes}}, got {model!r}")

    # --------------------------------------------------------------------------------------------- training
    training = _section(data, "training")
    _unknown(training, _KNOWN["training"], "training", unknown)
    if "num_steps" in training:
        put("train", "epochs", training["num_steps"], "training.num_steps")
    crit = training.get("criterion")
    if crit is not None:
        cls = crit.get("class") if isinstance(crit, dict) else crit
        if str(cls).upper() != "CE":
            raise ConfigError(f"training.criterion.class={cls!r}: prunekit trains with cross-entropy only; set it "
                              "to CE")
        if isinstance(crit, dict):
            _unknown(crit, ("class",), "training.criterion", unknown)
    opt = training.get("optimizer")
    if opt is not None:
        if not isinstance(opt, dict):
            raise ConfigError(f"training.optimizer must be a mapping {{class, learning_rate, ...}}, got {opt!r}")
        _unknown(opt, _OPTIMIZER, "training.optimizer", unknown)
        if "class" in opt:
            name = str(opt["class"]).lower()
            if name not in ("sgd", "adam", "adamw"):
                raise ConfigError(f"training.optimizer.class={opt['class']!r} is not available; use sgd (the seed's "
                                  "only optimizer), adam or adamw")
            put("train", "optimizer", name, "training.optimizer.class")
        for key, field in (("learning_rate", "lr"), ("momentum", "momentum"), ("w_decay", "weight_decay")):
            if key in opt:
                put("train", field, opt[key], f"training.optimizer.{key}")
        if "lr_drops" in opt:
            drops = opt["lr_drops"]
            if drops:
                put("train", "lr_schedule", "multistep", "training.optimizer.lr_drops")
                put("train", "milestones", list(drops), "training.optimizer.lr_drops")
                if "lr_drop_factor" in opt:
                    put("train", "gamma", opt["lr_drop_factor"], "training.optimizer.lr_drop_factor")
            else:
                put("train", "lr_schedule", "constant", "training.optimizer.lr_drops")
                if "lr_drop_factor" in opt:
                    remarks.append("training.optimizer.lr_drop_factor has no effect without lr_drops (as in the seed)")
        elif "lr_drop_factor" in opt:
            remarks.append("training.optimizer.lr_drop_factor has no effect without lr_drops (as in the seed)")
    comp = training.get("compressor")
    if comp is not None:
        if not isinstance(comp, dict):
            raise ConfigError(f"training.compressor must be a mapping {{class, mask, sparsity, warmup, batch_size}}, "
                              f"got {comp!r}")
        _compressor(comp, put, out, ignored, unknown, remarks)

    # ------------------------------------------------------------------------------------------- validation
    val = _section(data, "validation")
    _unknown(val, _KNOWN["validation"], "validation", unknown)
    if "metric" in val and str(val["metric"]).lower() != "acc":
        raise ConfigError(f"validation.metric={val['metric']!r}: prunekit keeps the checkpoint of the best validation "
                          "accuracy (test_acc_at_best_val); set it to acc")
    if "frequency" in val and val["frequency"] != 1:
        raise ConfigError(f"validation.frequency={val['frequency']!r}: prunekit validates after every epoch, which "
                          "decides the best-validation checkpoint; set it to 1")

    # ---------------------------------------------------------------- prunekit fields given beside the seed's
    for key, value in data.items():
        if key in SECTIONS or key == "model":
            continue
        if key not in NATIVE:
            unknown.append(_spelled(str(key), str(key), SECTIONS + NATIVE))
            continue
        if isinstance(value, str) and key == "data":
            value = {"name": value}
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            if key == "data" and "name" in value and value["name"] != out["data"].get("name"):
                out["data"] = {}  # another dataset: the seed's split belongs to the seed's dataset
            for k, v in value.items():
                _replace(out[key], k, v, f"{key}.{k}", src, remarks)
        else:
            _replace(out, key, copy.deepcopy(value), key, src, remarks)
    _raise_unknown(unknown)
    if native_model:
        node = out.setdefault("model", {})
        for k, v in native_model.items():
            _replace(node, k, v, f"model.{k}", src, remarks)

    if note is not None:
        if ignored:
            note.append("keys with no prunekit meaning (ignored): " + ", ".join(
                f"{k} ({_WHY[k]})" if k in _WHY else k for k in dict.fromkeys(ignored)))
        note.extend(remarks)
    return out


def _replace(node: dict, key: str, value, dotted: str, src: dict, remarks: list[str]) -> None:
    if key in node and node[key] != value and dotted in src:
        remarks.append(f"{dotted}={value!r} replaces {src[dotted]}'s {node[key]!r}")
    node[key] = copy.deepcopy(value)


def _arch(cls) -> str:
    from ..models import canonical_name

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


def _compressor(comp: dict, put, out: dict, ignored: list[str], unknown: list[str], remarks: list[str]) -> None:
    """``training.compressor`` -> the prune section (class, mask, sparsity, warmup, batch_size and any prunekit
    prune option)."""
    import dataclasses

    from ..prune import PruneOptions
    from ..registry import get_method
    from ..experiments.resolved import PRUNE_KEYS

    if "class" not in comp:
        raise ConfigError("training.compressor.class is missing: name a compressor code (none, random, magnitude, "
                          "grad_norm, snip, grasp, fisher_diag, fisher_pruner, fts, fbss; `prunekit methods`)")
    try:
        info = get_method(str(comp["class"]))
    except PrunekitError as e:
        raise ConfigError(f"training.compressor.class: {e}") from None
    put("prune", "method", info.name, "training.compressor.class")
    if "mask" in comp:
        mask = str(comp["mask"]).lower()
        if mask not in ("global", "layer"):
            raise ConfigError(f"training.compressor.mask={comp['mask']!r} must be 'global' or 'layer'")
        put("prune", "scope", mask, "training.compressor.mask")
    for key in ("sparsity", "warmup"):
        if key in comp:
            put("prune", key, comp[key], f"training.compressor.{key}")
    dense = info.kind == "dense"
    if not dense:
        # the seed skips every parameter whose name contains "linear": its output layer is never pruned
        put("prune", "exclude_output", True, "training.compressor")
    own = set(info.option_names())
    if "batch_size" in comp:
        if "batch_size" in own:
            put("prune", "batch_size", comp["batch_size"], "training.compressor.batch_size")
        elif not dense:
            remarks.append(f"training.compressor.batch_size={comp['batch_size']!r} has no effect for {info.name!r}, "
                           "which uses no scoring data (as in the seed)")
    shared = {f.name for f in dataclasses.fields(PruneOptions)}
    if dense:  # the dense baseline ignores every method's options (prunekit.experiments.config)
        from ..registry import methods

        own = {k for m in methods() for k in m.option_names()}
    for key, value in comp.items():
        if key in _COMPRESSOR:
            if key in _WHY_KEYS:
                ignored.append(f"training.compressor.{key}")
            continue
        if key in own or key in shared or key in PRUNE_KEYS:
            put("prune", key, value, f"training.compressor.{key}")
        else:  # a typo (sparsty) would prune at the default: said, with the keys it could have meant
            unknown.append(_spelled(f"training.compressor.{key}", str(key),
                                    _COMPRESSOR + tuple(own) + tuple(sorted(shared)) + PRUNE_KEYS))
