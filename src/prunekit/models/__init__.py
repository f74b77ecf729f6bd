"""Model definitions and a registry by name.

>>> model = get_model("resnet20", num_classes=10)
>>> model.input_shape
(3, 32, 32)

Published weights: ``load_published("efficientnet_lite0", get_model("efficientnet_lite0", num_classes=k))`` loads
the ImageNet-1k weights (all but a head of another size) and ``input_stats(name)`` gives the input normalization
they expect; see :mod:`prunekit.models.efficientnet`.
"""
from .efficientnet import EfficientNetLite0
from .lenet import LeNet5Caffe, LeNet300100
from .mlp import MLPNet, SynflowMLP
from .registry import (ModelInfo, canonical_name, get_model, input_stats, load_published, model_info, model_names,
                       published_names)
from .resnet import BasicBlock, CifarResNet, ResNet18
from .vgg import VGG, VGGKuangliu

__all__ = [
    "ModelInfo", "get_model", "model_names", "model_info", "canonical_name", "input_stats", "load_published",
    "published_names", "EfficientNetLite0",
    "LeNet300100", "LeNet5Caffe", "MLPNet", "SynflowMLP", "VGG", "VGGKuangliu", "ResNet18", "CifarResNet",
    "BasicBlock",
]
