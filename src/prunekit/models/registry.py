"""Registry of the built-in models by name: :func:`get_model`, :func:`model_names`, :func:`model_info`.

Names are case-insensitive and ``-`` equals ``_`` (separators may even be left out); aliases (``lenet5``, ``vgg16``, ...) map to canonical names.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

from torch import nn

from prunekit.errors import PrunekitError, unknown

from .common import check_num_classes, check_shape
from .efficientnet import IMAGENET_MEAN, IMAGENET_STD, EfficientNetLite0, load_efficientnet_lite0_imagenet
from .lenet import LeNet5Caffe, LeNet300100
from .mlp import MLPNet, SynflowMLP
from .resnet import CifarResNet, ResNet18
from .resnet_imagenet import ResNet50
from .vgg import VGG, VGGKuangliu

MNIST_SHAPE = (1, 28, 28)
CIFAR_SHAPE = (3, 32, 32)
IMAGENET_SHAPE = (3, 224, 224)


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model: canonical name, default (C, H, W) input, family, one-line summary;
    for a model with published weights (:func:`load_published`) also what they are (``weights``) and the
    per-channel mean and std of the input normalization they were trained with (``(x - mean) / std`` for
    inputs in [0, 1]); None and "" otherwise."""

    name: str
    default_input_shape: tuple[int, ...]
    family: str  # 'mlp' | 'lenet' | 'vgg' | 'resnet' | 'efficientnet'
    summary: str
    weights: str = ""
    input_mean: Optional[tuple[float, ...]] = None
    input_std: Optional[tuple[float, ...]] = None


Builder = Callable[..., nn.Module]  # builder(num_classes=..., input_shape=...) -> nn.Module

Loader = Callable[..., list]  # loader(model, root=...) -> names of the state entries left at their init

_MODELS: dict[str, tuple[Builder, ModelInfo]] = {}
_ALIASES: dict[str, str] = {}
_PUBLISHED: dict[str, Loader] = {}


def _register(name: str, family: str, shape: tuple[int, ...], summary: str, builder: Builder,
              aliases: Sequence[str] = (), published: Optional[tuple[str, Loader, tuple, tuple]] = None) -> None:
    extra = {}
    if published is not None:
        weights, _PUBLISHED[name], mean, std = published
        extra = {"weights": weights, "input_mean": mean, "input_std": std}
    _MODELS[name] = (builder, ModelInfo(name, shape, family, summary, **extra))
    for alias in aliases:
        _ALIASES[alias] = name


_register("lenet_300_100", "lenet", MNIST_SHAPE, "LeNet-300-100 MLP, 784-300-100-10 with ReLU", LeNet300100)
_register("lenet5_caffe", "lenet", MNIST_SHAPE,
          "Caffe LeNet-5: conv 20 and 50 (5x5, no ReLU) with max-pools, fc 500, fc", LeNet5Caffe, ["lenet5"])
_register("mlpnet", "mlp", MNIST_SHAPE, "784-40-20-10 ReLU MLP without biases, log-softmax output", MLPNet)
_register("synflow_mlp", "mlp", MNIST_SHAPE, "SynFlow fully connected net, 784-100x5-10 with ReLU", SynflowMLP)
for _depth in (11, 13, 16, 19):
    _register(f"vgg{_depth}_bn", "vgg", CIFAR_SHAPE, f"open_lth CIFAR VGG-{_depth} with batch norm",
              partial(VGG, _depth), [f"vgg{_depth}"])
_register("vgg19_kuangliu", "vgg", CIFAR_SHAPE, "kuangliu/pytorch-cifar VGG-19 with batch norm", VGGKuangliu)
_register("resnet18", "resnet", CIFAR_SHAPE, "kuangliu/pytorch-cifar ResNet-18 for 32x32 images", ResNet18)
for _depth in (20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", "resnet", CIFAR_SHAPE, f"He et al. CIFAR ResNet-{_depth} (open_lth cifar_resnet)",
              partial(CifarResNet, _depth))
_register("resnet50", "resnet", IMAGENET_SHAPE, "torchvision ImageNet ResNet-50 (Bottleneck [3, 4, 6, 3])", ResNet50)
_register("efficientnet_lite0", "efficientnet", IMAGENET_SHAPE,
          "EfficientNet-Lite0 (ReLU6, no squeeze-excitation, TF 'SAME' padding, BN momentum 0.1), 16 MBConv blocks",
          EfficientNetLite0,
          published=("ImageNet-1k, 1000 classes, 224x224 (`prunekit models fetch efficientnet_lite0`)",
                     load_efficientnet_lite0_imagenet, IMAGENET_MEAN, IMAGENET_STD))


def model_names() -> list[str]:
    """Canonical names of the registered models (aliases excluded)."""
    return list(_MODELS)


def canonical_name(name: str) -> str:
    """The canonical name for ``name``; unknown names raise a PrunekitError that suggests close names.

    Matching ignores case, treats ``-`` as ``_``, resolves aliases, and as a fallback ignores separators altogether.
    """
    if not isinstance(name, str):
        raise PrunekitError(f"model name must be a string, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key in _MODELS:
        return key
    squashed = {_squash(k): v for k, v in [*((m, m) for m in _MODELS), *_ALIASES.items()]}
    if _squash(key) in squashed:  # "resnet-20", "vgg16bn", "lenet300100"
        return squashed[_squash(key)]
    raise unknown("model", name, model_names())


def _squash(key: str) -> str:
    return key.replace("_", "")


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of model ``name``."""
    return _MODELS[canonical_name(name)][1]


def get_model(name: str, num_classes: int = 10, input_shape: Optional[Sequence[int]] = None) -> nn.Module:
    """A freshly initialised model ``name`` with ``num_classes`` outputs for inputs of ``input_shape`` (no batch dim).

    ``input_shape`` defaults to the model's :attr:`ModelInfo.default_input_shape`. The model carries the attributes
    ``input_shape`` (tuple) and ``num_classes``. Initialisation uses torch's global RNG, so it is reproducible
    under ``torch.manual_seed``.
    """
    builder, info = _MODELS[canonical_name(name)]
    check_num_classes(num_classes)
    shape = info.default_input_shape if input_shape is None else check_shape(input_shape)
    model = builder(num_classes=num_classes, input_shape=shape)
    model.input_shape, model.num_classes = tuple(shape), num_classes
    return model


def published_names() -> list[str]:
    """Canonical names of the models that have published weights (:func:`load_published`)."""
    return list(_PUBLISHED)


def _published(name: str) -> str:
    key = canonical_name(name)
    if key not in _PUBLISHED:
        raise PrunekitError(f"model {key!r} has no published weights in prunekit (models with weights: "
                            f"{', '.join(_PUBLISHED)}): train it, or start from a run or file")
    return key


def input_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of the input normalization ``(x - mean) / std`` (inputs in [0, 1]) that the
    published weights of model ``name`` expect; a PrunekitError for a model without published weights."""
    info = _MODELS[_published(name)][1]
    return info.input_mean, info.input_std  # type: ignore[return-value]


def load_published(name: str, model: nn.Module, root=None) -> list[str]:
    """Load the published weights of model ``name`` (``efficientnet_lite0``: ImageNet-1k) into ``model``, built by
    ``get_model(name, num_classes=k, input_shape=(3, H, W))``, in place; returns the names of the state entries
    left at their initialisation: the classifier (``fc.weight``, ``fc.bias``) when ``k`` differs from the weights'
    class count (it keeps the seeded fresh init of :func:`get_model`), else none.

    ``root``: the data directory the weights were fetched into (default ``PRUNEKIT_DATA`` or
    ``~/.cache/prunekit/data``); a missing file raises :class:`~prunekit.errors.DatasetMissingError` naming the
    fetch command. Strict: every tensor is shape-checked and every entry of ``model`` but that head is written.
    """
    return _PUBLISHED[_published(name)](model, root=root)
