"""Seed 001's command-line parameters accepted as top-level config keys (methods/imp.md section 5).

::

    net_arch: vgg16            # -> model.name (vgg16_bn: prunekit's VGG-16; see the note on differences)
    net_dataset: MNIST         # -> data.name
    net_lr: 0.01               # -> train.lr (SGD, no momentum, as the seed)
    net_train_epochs: 20       # chunks per level -> prune.max_chunks, train.epochs = (warm-up + this) x chunk
    net_train_per_epoch: 2     # epochs per chunk -> prune.chunk_epochs
    net_warmup: 10             # warm-up chunks -> prune.rewind: step:<net_warmup x chunk>ep
    net_batch_size: 64         # -> train.batch_size
    net_weight_decay: 5e-4     # -> train.weight_decay (every code; the seed gives it to ciap/giap only)
    net_pretrained: 0          # 1 (ImageNet weights) is not available offline: an error with the fix
    prune_method: ciap         # -> prune.method
    prune_p: 1.0               # -> prune.p
    prune_q: 2.0               # -> prune.q
    prune_ratio: 0.2           # -> prune.prune_fraction (lth; its output layer at the same rate, as the seed)
    prune_epsilon: 0.11        # -> prune.epsilon
    exper_imp_total_iter: 15   # iterations including the dense one -> prune.levels = 14
    exper_num_trial: 3         # -> grid over seed: [0, 1, 2]

A key set both ways (``net_lr`` and ``train.lr``) is an error. :func:`translate` is applied by
:func:`prunekit.experiments.expand` before anything else.
"""
from __future__ import annotations

import copy

from ..errors import ConfigError

KEYS = ("net_arch", "net_dataset", "net_lr", "net_train_epochs", "net_train_per_epoch", "net_warmup", "net_batch_size",
        "net_weight_decay", "net_pretrained", "prune_method", "prune_p", "prune_q", "prune_ratio", "prune_epsilon",
        "exper_imp_total_iter", "exper_num_trial")

ARCH = {"vgg11": "vgg11_bn", "vgg16": "vgg16_bn", "resnet18": "resnet18"}
DATASETS = {"mnist": "mnist", "cifar10": "cifar10", "cifar100": "cifar100"}
UNSUPPORTED_ARCH = ("alexnet", "densenet", "googlenet")


def _set(data: dict, section: str, key: str, value, flag: str) -> None:
    node = data.setdefault(section, {})
    if isinstance(node, str):  # model: name / data: name shorthand
        node = data[section] = {"name": node}
    if key in node and node[key] != value:
        raise ConfigError(f"{flag}={value!r} and {section}.{key}={node[key]!r} both set it: keep one of them")
    node[key] = value


def _int(flag: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{flag} must be a whole number >= {low}, got {value!r}")
    return value


def translate(data: dict) -> dict:
    """A copy of ``data`` with the seed-001 keys replaced by prunekit's fields (identity when there are none)."""
    if not isinstance(data, dict) or not any(k in data for k in KEYS):
        return data
    seed = {k: data[k] for k in KEYS if k in data}
    out = copy.deepcopy({k: v for k, v in data.items() if k not in KEYS})
    if "net_arch" in seed:
        arch = str(seed["net_arch"]).lower()
        if arch in UNSUPPORTED_ARCH or arch not in ARCH:
            raise ConfigError(f"net_arch={seed['net_arch']!r} has no prunekit model; use one of {', '.join(ARCH)} "
                              "or set model.name")
        _set(out, "model", "name", ARCH[arch], "net_arch")
    if "net_dataset" in seed:
        ds = str(seed["net_dataset"]).lower()
        if ds not in DATASETS:
            raise ConfigError(f"net_dataset={seed['net_dataset']!r} is not available in prunekit (FashionMNIST and "
                              f"Tiny-ImageNet are not packaged); use one of MNIST, CIFAR10, CIFAR100")
        _set(out, "data", "name", DATASETS[ds], "net_dataset")
    if seed.get("net_pretrained", 0):
        raise ConfigError("net_pretrained=1 asks for torchvision's ImageNet weights, which prunekit does not ship; set "
                          "net_pretrained: 0 (train from scratch) or model.pretrained: <weights.pt>")
    chunk = _int("net_train_per_epoch", seed.get("net_train_per_epoch", 2), 1)
    chunks = _int("net_train_epochs", seed.get("net_train_epochs", 100), 1)
    warm = _int("net_warmup", seed.get("net_warmup", 20), 0)
    prune = out.setdefault("prune", {})
    if "prune_method" in seed:
        _set(out, "prune", "method", seed["prune_method"], "prune_method")
    method = prune.get("method", "lth")
    prune.setdefault("method", method)
    _set(out, "train", "epochs", (warm + chunks) * chunk, "net_train_epochs")
    _set(out, "prune", "chunk_epochs", chunk, "net_train_per_epoch")
    _set(out, "prune", "max_chunks", chunks, "net_train_epochs")
    _set(out, "prune", "rewind", f"step:{warm * chunk}ep" if warm else "init", "net_warmup")
    for flag, section, key in (("net_lr", "train", "lr"), ("net_batch_size", "train", "batch_size"),
                               ("net_weight_decay", "train", "weight_decay"), ("prune_p", "prune", "p"),
                               ("prune_q", "prune", "q"), ("prune_ratio", "prune", "prune_fraction"),
                               ("prune_epsilon", "prune", "epsilon")):
        if flag in seed:
            _set(out, section, key, seed[flag], flag)
    train = out["train"]
    train.setdefault("optimizer", "sgd")  # the seed: plain SGD at a constant rate, batch 64, weight decay 5e-4
    train.setdefault("momentum", 0.0)
    train.setdefault("lr", 0.01)
    train.setdefault("batch_size", 64)
    train.setdefault("weight_decay", 5e-4)
    if method == "lth":
        prune.setdefault("scope", "layer")
        prune.setdefault("output_fraction", prune.get("prune_fraction", 0.2))
    if "exper_imp_total_iter" in seed:
        _set(out, "prune", "levels", _int("exper_imp_total_iter", seed["exper_imp_total_iter"], 2) - 1,
             "exper_imp_total_iter")
    if "exper_num_trial" in seed:
        n = _int("exper_num_trial", seed["exper_num_trial"], 1)
        grid = out.setdefault("grid", {})
        if "seed" in grid:
            raise ConfigError("exper_num_trial and grid.seed both set the trials: keep one of them")
        grid["seed"] = list(range(n))
    return out
